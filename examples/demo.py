"""A runnable tour of the core: one limiter, several tiers, costs and the decision fields."""

from __future__ import annotations

from ratelimit_middleware import MultiTierRateLimiter, RateLimitConfig, RateLimiter


def main() -> None:
    limiter = RateLimiter(max_requests=3, window_seconds=60)
    for attempt in range(1, 5):
        decision = limiter.check("alice", "gpt-4")
        print(f"alice gpt-4 request {attempt}: allowed={decision.allowed} remaining={decision.remaining}")
    print("requests counted for alice on gpt-4:", limiter.get_request_count("alice", "gpt-4"))

    tiers = MultiTierRateLimiter(
        per_user_model=RateLimitConfig(100, 3600),
        per_model=RateLimitConfig.parse("2/minute"),
    )
    for user in ["alice", "bob", "carol"]:
        allowed, reason = tiers.allow(user, "gpt-4")
        print(f"{user} on gpt-4: allowed={allowed} reason={reason}")


if __name__ == "__main__":
    main()
