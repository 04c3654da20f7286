"""The tokens a service refuses although they verify: those of a session that ended, and those issued before a
revocation of their subject (or of everyone), as read from identity.revocations.v1 (`bastion.revocations.feed`).

Fail closed: until the feed has been read to its end once, and when it was last known read to its end longer ago
than MAX_STALENESS, every token is refused as `revocations_unavailable` (the interceptor answers UNAVAILABLE), as
when the realm's keys cannot be had: a service that cannot know whether access was revoked does not guess. So too
while the realm's watch (the audit service) is silent: until its first `RevocationsCurrent` was read, and when the
latest one is older than MAX_WATCH_SILENCE. A topic read to its end says nothing was revoked only if somebody was
watching.
"""

import threading
import time
from collections.abc import Callable

from bastion.grpc.tokens import AuthenticationError, AuthReason, Principal

Clock = Callable[[], float]
# Keycloak stamps an admin event before the change commits: a token issued meanwhile carries what the change took
# away, with an `iat` that may fall in the next second. `iat` counts whole seconds besides. So tokens issued up to this
# many seconds after the change's second are refused too (their holders sign in again a moment later): never the
# other way round.
COMMIT_MARGIN_SECONDS = 2
PRUNE_EVERY_SECONDS = 1.0


class RevokedTokens:
    """Per subject, and for everyone, the second up to which tokens are revoked (`iat` at or before it); and the
    sessions that ended, whose every token is refused (by its `sid`).

    KEEP_SECONDS: how long a revocation matters (the tokens it ends have expired after that: the realm's token
    lifetime plus the validator's leeway); older ones are forgotten, so memory is bounded by the revocations of the
    last minutes."""

    def __init__(self, keep_seconds: float, max_staleness_seconds: float, max_watch_silence_seconds: float,
                 clock: Clock = time.time, monotonic: Clock = time.monotonic) -> None:
        if keep_seconds <= 0 or max_staleness_seconds <= 0 or max_watch_silence_seconds <= 0:
            raise ValueError("keep_seconds, max_staleness_seconds and max_watch_silence_seconds must be positive")
        self.keep_seconds = keep_seconds
        self.max_staleness_seconds = max_staleness_seconds
        self.max_watch_silence_seconds = max_watch_silence_seconds
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._subjects: dict[str, int] = {}
        self._sessions: dict[str, int] = {}  # session id -> the second it ended
        self._everyone = 0
        self._current_at: float | None = None
        self._watched_until: float | None = None  # wall time: every change before it was published
        self._watched_heard_at: float | None = None  # monotonic: when the latest such word was read
        self._pruned_at = float("-inf")

    def revoke(self, subject: str | None, revoked_at_ms: int, session: str | None = None) -> None:
        """Every token of SESSION when it is given; otherwise tokens of SUBJECT (of everyone when None) with `iat` at
        or before REVOKED_AT_MS, and up to COMMIT_MARGIN_SECONDS after its second, are refused from now on."""
        second = revoked_at_ms // 1000 + COMMIT_MARGIN_SECONDS
        with self._lock:
            if session is not None:
                self._sessions[session] = max(self._sessions.get(session, 0), second)
            elif subject is None:
                self._everyone = max(self._everyone, second)
            else:
                self._subjects[subject] = max(self._subjects.get(subject, 0), second)
            self._forget_expired()

    def _forget_expired(self) -> None:
        """Forget the revocations older than KEEP_SECONDS, at most once a second: a scan per revocation would cost
        the square of their number (anybody can sign in and out again and again, each sign-out one revocation)."""
        now = self._clock()
        if now - self._pruned_at < PRUNE_EVERY_SECONDS:
            return
        self._pruned_at = now
        horizon = now - self.keep_seconds
        for held in (self._subjects, self._sessions):
            for key in [key for key, second in held.items() if second < horizon]:
                del held[key]

    def confirm_current(self, as_of: float) -> None:
        """The feed was read to its end as it stood at monotonic time AS_OF."""
        with self._lock:
            if self._current_at is None or as_of > self._current_at:
                self._current_at = as_of

    def watched(self, until_ms: int) -> float:
        """The realm's watch said that every change before UNTIL_MS (epoch milliseconds) was published. Return the
        latest such time heard (an older word, replayed or read again, does not move it back), in epoch seconds."""
        until = until_ms / 1000
        with self._lock:
            if self._watched_until is None or until > self._watched_until:
                self._watched_until = until
                self._watched_heard_at = self._monotonic()
            return self._watched_until

    def is_current(self) -> bool:
        """Whether tokens are checked now (the feed was read to its end recently enough, and the watch was heard
        from recently enough), not refused."""
        return self._unavailable() is None

    def _unavailable(self) -> str | None:
        """Why nobody can tell now whether a token was revoked; None when somebody can."""
        current_at = self._current_at
        if current_at is None:
            return "the token revocations have not been read yet"
        age = self._monotonic() - current_at
        if age > self.max_staleness_seconds:
            return f"the token revocations were last read {age:.0f} s ago"
        watched_until, heard_at = self._watched_until, self._watched_heard_at
        if watched_until is None or heard_at is None:
            return "the realm's watch (the audit service) has not been heard from yet"
        # The word's own date tells how old it was when read (the lookback after a start); the monotonic clock, how
        # long nothing newer came since, whatever this host's wall clock says (behind the broker's, or set back).
        silence = max(self._clock() - watched_until, self._monotonic() - heard_at)
        if silence > self.max_watch_silence_seconds:
            return f"the realm's watch (the audit service) was last heard from {silence:.0f} s ago"
        return None

    def check(self, principal: Principal) -> None:
        """Refuse PRINCIPAL's token if its access was revoked after it was issued, or if nobody can tell."""
        unavailable = self._unavailable()
        if unavailable is not None:
            raise AuthenticationError(AuthReason.REVOCATIONS_UNAVAILABLE, unavailable)
        revoked_up_to = max(self._everyone, self._subjects.get(principal.subject, 0))
        if revoked_up_to and principal.issued_at <= revoked_up_to:
            raise AuthenticationError(AuthReason.REVOKED, "access was revoked after this token was issued: "
                                                          "sign in again")
        if principal.session_id is not None and principal.session_id in self._sessions:
            raise AuthenticationError(AuthReason.REVOKED, "the session this token was issued in has ended: "
                                                          "sign in again")

    def __len__(self) -> int:
        return len(self._subjects) + len(self._sessions)
