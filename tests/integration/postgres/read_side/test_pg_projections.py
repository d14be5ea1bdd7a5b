"""The read-side suite on PostgreSQL: the same test bodies as on SQLite, with this
directory's fixtures (own schemas per test; same-schema and separate-schema layouts)."""

from __future__ import annotations

import pytest
from tests.integration.sqlite.test_async_projection import (  # noqa: F401
    test_a_busy_leader_beats_its_lease_every_so_often_not_per_batch,
    test_a_fence_that_does_not_beat_still_fences_and_locks,
    test_a_leader_hung_in_a_handler_is_taken_over,
    test_catches_up_and_follows,
    test_fenced_projector_cannot_commit,
    test_lag_reported_while_stopped,
    test_query_session_is_read_only,
    test_resumes_from_checkpoint_without_reapplying,
    test_second_projector_stands_by_and_takes_over,
    test_stop_is_bounded_while_a_leader_hangs,
    test_stop_is_prompt_when_idle,
)
from tests.integration.sqlite.test_consistency import (  # noqa: F401
    projector,
    test_a_nan_timeout_cannot_delay_another_querys_deadline,
    test_a_token_this_process_applied_needs_no_read_database_round_trip,
    test_a_token_whose_event_is_parked_is_stale_not_missing,
    test_bad_timeouts_are_refused,
    test_fail_policy_raises_at_once,
    test_inline_mode_is_never_stale,
    test_misconfigurations_are_loud,
    test_no_token_means_no_check,
    test_only_the_commands_own_parked_events_make_its_token_stale,
    test_query_that_writes_fails,
    test_read_after_context,
    test_stale_policy_flags_old_data,
    test_token_from_future_fails_fast,
    test_wait_policy_reads_own_write,
    test_wait_policy_times_out,
)
from tests.integration.sqlite.test_rebuild_poison_modes import (  # noqa: F401
    test_an_undecodable_event_type_is_parked_not_skipped,
    test_database_faults_are_retried_not_parked,
    test_inline_failure_fails_the_command,
    test_move_inline_to_async_and_back,
    test_poison_parked_then_retried,
    test_rebuild_equals_incremental,
)

pytestmark = pytest.mark.postgres
