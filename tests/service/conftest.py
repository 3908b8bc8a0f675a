import pytest

from tests.service.repo_builder import build_test_repo


@pytest.fixture(scope="session")
def test_repo(tmp_path_factory):
    return build_test_repo(tmp_path_factory.mktemp("repo"))
