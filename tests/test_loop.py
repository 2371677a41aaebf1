import asyncio

import pytest
import uvloop


@pytest.mark.unit
async def test_tests_run_on_uvloop() -> None:
    """The service runs on uvloop; so do the tests (uvloop's transports differ from asyncio's)."""
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
