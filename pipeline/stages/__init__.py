"""Stages: the StreamBatch spread over processes (block split), the dispatch rules, the transport, and
the simulator that checks schedules without a model (DESIGN §6)."""
