"""What proves and times a bundle: runners (one per runtime), verify, benchmark, optimize, the demo, and
the environment report."""
