import pytest

import llmdrop


def test_every_public_name_resolves_lazily():
    for name in llmdrop.__all__:
        assert getattr(llmdrop, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        llmdrop.nope  # noqa: B018
