"""Run the greeter example end to end: start the server, call it, stop it."""
import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    subprocess.run([sys.executable, os.path.join(HERE, "generate.py")], check=True)
    port = free_port()
    server = subprocess.Popen([sys.executable, os.path.join(HERE, "server.py"),
                               "--port", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()     # "serving on ..." once it listens
        if not line.startswith("serving on"):
            sys.exit(f"the server did not start (exit code {server.wait()})")
        print(f"server: {line.strip()}")
        subprocess.run([sys.executable, os.path.join(HERE, "client.py"),
                        "--port", str(port)], check=True, timeout=60)
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
