"""Robustness audits of served models: the attack schedule and its statistics (engine), the
sanity checks that say whether the figures can be trusted (checks), the self-contained HTML
report (report), and the background jobs behind the admin API (jobs)."""
