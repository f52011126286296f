"""notifier's load harness: notifier, a raw baseline and BullMQ driven by one workload in one run.

``./dev bench`` (``python -m bench``) runs it; see bench/README.md for what each figure means.
"""
