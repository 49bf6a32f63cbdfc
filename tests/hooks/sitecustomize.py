"""Fault injection for the adversarial tests, loaded only when a test puts this folder on PYTHONPATH.

LORASMITH_TEST_SLOW_REPLACE="<substring>:<seconds>" makes every os.replace whose destination contains the
substring first append the destination to the file LORASMITH_TEST_MARK, then sleep: a test waits for the
mark and sends a signal that lands inside that save, deterministically.
"""

import os
import time

_spec = os.environ.get("LORASMITH_TEST_SLOW_REPLACE")
if _spec:
    _pattern, _seconds = _spec.rsplit(":", 1)
    _mark = os.environ.get("LORASMITH_TEST_MARK")
    _replace = os.replace

    def _slow_replace(src, dst, *args, **kwargs):
        if _pattern in os.fspath(dst):
            if _mark:
                with open(_mark, "a", encoding="utf-8") as handle:
                    handle.write(f"{os.getpid()} {os.fspath(dst)}\n")
            time.sleep(float(_seconds))
        return _replace(src, dst, *args, **kwargs)

    os.replace = _slow_replace
