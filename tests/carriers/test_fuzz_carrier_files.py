"""A bounded run of the carrier-directory corruption fuzzer (tests/helpers/fuzz_carrier_files.py; the long
run is ``make fuzz``): every damaged directory loads correctly or is refused naming the file,
under a 2 GiB address-space limit and 30 s per case."""

from __future__ import annotations

import os

from tests.helpers.fuzz_carrier_files import FAILURES, MUTATIONS, fuzz


def test_corrupted_carriers_load_correctly_or_are_refused_by_name():
    n = int(os.environ.get("LCDD_FUZZ_CARRIER_CASES", "60"))
    summary, results = fuzz(n, seed=1)
    bad = [f"{r['outcome']}: {r['mutations']} {r.get('error', '')}" for r in results if r["outcome"] in FAILURES]
    assert not bad, "\n".join(bad)
    assert summary["cases"] == n and set(summary["by_first_mutation"]) == set(MUTATIONS)
    assert summary["outcomes"].get("refused", 0) > n // 2  # the mutations do damage


def test_the_address_space_limit_is_real(tmp_path):
    """A worker limited to 200 MiB cannot even import torch: the limit applies to the loading process."""
    import pytest

    from tests.helpers.fuzz_carrier_files import make_cases, make_originals, run

    cases = make_cases(tmp_path, make_originals(tmp_path / "o")[:1], 1, seed=0)
    with pytest.raises(RuntimeError, match="failed before its first case"):
        run(cases, limit_gib=0.2, timeout_s=30)
