/*
 * bridge.h: the completion-queue bridge between gRPC and the asyncio loop.
 *
 * Owns one completion queue, the native poller thread and the eventfd, and
 * the baton protocol of DESIGN.md section 3. Nothing here touches a Python
 * object; the server (server.c) runs the loop side with the GIL held.
 */
#ifndef ASYNCGRPC_BRIDGE_H
#define ASYNCGRPC_BRIDGE_H

#include "types.h"

/* Create the queue and the eventfd. Returns 0, or -1 with errno set. */
int bridge_init(Bridge *b, Counters *counters);
/* Start the poller thread; the baton starts with the poller. 0 or errno. */
int bridge_start(Bridge *b);
/* Loop side: take the handed-over event, if any. Returns 1 if *ev is set. */
int bridge_take(Bridge *b, grpc_event *ev);
/* Loop side: acknowledge the eventfd (non-blocking read). */
void bridge_ack_wakeup(Bridge *b);
/* Loop side, holding the baton: one non-blocking poll. */
grpc_event bridge_poll(Bridge *b, int look);
/* Loop side: give the baton back to the poller. */
void bridge_hand_back(Bridge *b);
/* Does the loop hold the baton? */
int bridge_loop_holds_baton(Bridge *b);
/* Stop and join the poller (call without the GIL; the queue must be shut
 * down first so that a poller blocked in cq_next returns). */
void bridge_stop_and_join(Bridge *b);
/* Free the queue and the eventfd (after the queue reported shutdown). */
void bridge_destroy(Bridge *b);

#endif
