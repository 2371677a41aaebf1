import asyncio

import pytest
import uvloop


@pytest.mark.unit
async def test_tests_run_on_uvloop() -> None:
    """The service runs on uvloop; so do the tests (uvloop's transports differ from asyncio's)."""
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


@pytest.mark.unit
def test_a_worker_raises_its_open_files_to_the_hard_limit() -> None:
    """A stampede holds a descriptor per shopper: a worker does not stop at a default
    soft limit of 1,024 when the host allows more."""
    import resource

    from stack.processes import raise_open_files

    was = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = was[1]
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"this host's hard limit is {hard}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        raised = raise_open_files()
        assert raised > 1024
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, was)
