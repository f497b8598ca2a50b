"""Stress instruments for moltbotd: a protocol fuzzer and a chaos soak (issue 14).

`make fuzz N=100000` and `make soak MINUTES=10` run them in full; tests/test_fuzz.py and
tests/test_soak.py run short forms in `make test`. Both start their own daemon on a
temporary socket and model repository (stress.daemon) and exit non-zero on a missed
target (stress.report).
"""
