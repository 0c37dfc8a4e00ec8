"""Queue names are part of the deployment contract: pinned here."""

import pytest

from queue_engine import keys


def test_queue_names_are_pinned():
    """Each model has an interactive and a bulk lane with fixed names."""
    assert keys.queue_name("tiny") == "qe.tiny.interactive"
    assert keys.queue_name("tiny", "bulk") == "qe.tiny.bulk"
    assert keys.model_queues("llama-70b") == ["qe.llama-70b.interactive", "qe.llama-70b.bulk"]
    assert keys.WEBHOOK_QUEUE == "qe.webhooks"
    assert keys.RUN_JOB_TASK == "queue_engine.run_job"
    assert keys.BROKER_MARKER == "qe:broker-marker"


def test_queue_name_rejects_unknown_lane():
    """A lane that does not exist is an error, not a new queue."""
    with pytest.raises(ValueError, match="unknown lane 'urgent'"):
        keys.queue_name("tiny", "urgent")
