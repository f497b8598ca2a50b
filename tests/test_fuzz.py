"""The fuzzer's short form (issue 14): `make fuzz N=100000` runs the long one.

3,000 frames of every malformed kind (stress.frames) against a live daemon while good
requests check it keeps serving; the same targets as the long form. Select with
`pytest -m stress`.
"""

import pytest

from stress.frames import make_case
from stress.fuzz import Settings, fuzz

pytestmark = pytest.mark.stress


@pytest.mark.timeout(240)
def test_fuzz_short_form_meets_every_target():
    outcome = fuzz(Settings(frames=3000, seed=14, max_seconds=150))
    if not outcome.ok:
        pytest.fail("\n" + outcome.text, pytrace=False)


def test_cases_are_deterministic():
    """A finding's case is replayed from its seed and index alone."""
    assert make_case(14, 1234) == make_case(14, 1234)
    assert make_case(14, 1234) != make_case(15, 1234)
