"""What the suite itself relies on: caches out of the user's home, the repository importable."""

from pathlib import Path

import torch

from ehap_fx.latency import default_cache


def test_caches_are_not_under_the_users_home():
    home_cache = Path.home() / ".cache"
    for path in (default_cache(), Path(torch.hub.get_dir())):
        assert home_cache not in path.parents, path
        assert "ehap-test-cache-" in str(path), path


def test_tests_package_imports_from_the_repository_root():
    import tests.nets

    assert Path(tests.nets.__file__).resolve().parent == Path(__file__).resolve().parent
