"""The runtime's conformance suite, run against this plugin as installed (entry point `sjf`)."""

from runtime.conformance import SchedulerConformance


class TestShortestPromptFirst(SchedulerConformance):
    scheduler = "sjf"
    scheduler_options = {"max_wait_steps": 2, "max_prefill_tokens": 16}
