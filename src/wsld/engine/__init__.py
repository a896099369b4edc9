"""The training engine: the step (``step``), optimiser and schedule (``optim``), evaluation, the run directory and the loop (``loop``)."""
