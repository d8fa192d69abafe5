"""Living with torchrun: a process that ends with its agent, errors said once, and a peer's exit recognised."""
from __future__ import annotations

import datetime
import hashlib
import os
import threading
import time
from typing import Callable, NoReturn

import torch.distributed as dist


_GONE = threading.Lock()


def stop_as_torchrun_is_gone(rank: int, say: Callable[[str], None]) -> NoReturn:
    """End this process, saying why, where its torchrun is gone (the watch below, or its store failing first)."""
    with _GONE:  # (a second finder waits for the exit)
        say(f"torchrun has stopped, so process {rank} stops too; the last save is intact: add "
            "--continue_train to go on from there")
        os._exit(1)  # (saves are atomic: stopping anywhere keeps the last one whole)


def watch_torchrun(rank: int, say: Callable[[str], None]) -> None:
    """torchrun starts its processes in sessions of their own: they outlived a torchrun killed with SIGKILL
    (or by the OOM killer), trained on and kept saving over the checkpoints of a --continue_train started
    after it. Each now watches its torchrun (its parent) and ends when that is gone."""
    agent = os.getppid()

    def watch() -> None:
        while os.getppid() == agent:
            time.sleep(1)
        stop_as_torchrun_is_gone(rank, say)

    threading.Thread(target=watch, name="torchrun watch", daemon=True).start()


def first_to_say(sentence: str) -> bool:
    """Whether no other process of this torchrun group said ``sentence`` already: an error in the options or the data
    hits every process alike, and printed it once each. torchrun's agent keeps a store that outlives the processes,
    where each sentence is counted; True without one (not under torchrun) or when it does not answer."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return True
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=5))
        key = "/".join(["fastp2phd said", os.environ.get("TORCHELASTIC_RUN_ID", ""),  # (a restart says it anew)
                        os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"), hashlib.sha1(sentence.encode()).hexdigest()])
        return store.add(key, 1) == 1
    except Exception:  # (a sentence twice rather than none)
        return True


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_stopped(exc: RuntimeError) -> bool:
    """Whether ``exc`` is a collective failing because another process of a torchrun group exited."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and (
        isinstance(exc, dist.DistNetworkError) or any(text in str(exc) for text in _PEER_GONE))
