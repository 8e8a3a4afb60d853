"""The ``agentsd`` command-line tools (generate, bench, eval), built on the public core API.

The core (``agentsd.apply_patch`` and friends) never imports anything from here. Shared pieces
live at this level; each subcommand has its own folder (``generate/``, ``bench/``, ``evaluate/``).
"""
