"""The chaos soak's short form (issue 14): `make soak MINUTES=10` runs the long one.

60 s of pipelined load from a raw socket, an AsyncClient and direct-channel Clients
while workers are killed and frozen and the models switched, canaried, promoted, rolled
back, scaled and reloaded; the same targets as the long form. Select with
`pytest -m stress`.
"""

import pytest

from stress.soak import Settings, soak

pytestmark = pytest.mark.stress


@pytest.mark.timeout(240)
def test_soak_short_form_meets_every_target():
    outcome = soak(Settings(seconds=60, seed=14, warmup=10, drain=20))
    if not outcome.ok:
        pytest.fail("\n" + outcome.text, pytrace=False)
