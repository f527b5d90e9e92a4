"""The build's error when the gRPC C core or pkg-config is missing."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_missing_grpc_names_the_package_to_install(tmp_path):
    env = dict(os.environ, PKG_CONFIG_LIBDIR=str(tmp_path), PKG_CONFIG_PATH=str(tmp_path))
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "libgrpc-dev" in result.stderr and "grpc-devel" in result.stderr
    assert "brew install grpc" in result.stderr


def test_missing_pkg_config_is_reported(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "pkg-config was not found" in result.stderr
