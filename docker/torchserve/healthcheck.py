"""Container health check for TorchServe: healthy only when the model has a READY worker.

TorchServe's /ping says Healthy even while a worker crash-loops, so this asks the management API
(with the management key TorchServe wrote to key_file.json) for the model's workers.
"""

import json
import os
import sys
import urllib.request

MODEL = os.environ.get("ERC_MODEL_NAME", "mnist-er")
KEY_FILE = os.path.join(os.environ.get("HOME", "/home/model-server"), "key_file.json")


def main() -> int:
    try:
        with open(KEY_FILE) as fh:
            key = json.load(fh)["management"]["key"]
        req = urllib.request.Request(
            f"http://127.0.0.1:8081/models/{MODEL}", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(req, timeout=4) as resp:
            workers = json.load(resp)[0].get("workers", [])
    except Exception as exc:  # any failure means not healthy
        sys.stderr.write(f"unhealthy: {exc}\n")
        return 1
    ready = any(w.get("status") == "READY" for w in workers)
    if not ready:
        sys.stderr.write(f"unhealthy: no READY worker for {MODEL}: {workers}\n")
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
