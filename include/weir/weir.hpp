// weir: keeps programs calling rate-limited HTTP APIs running at full speed without failing.
// The umbrella header; each concept also has a header of its own.
#pragma once

#include <weir/composition/pipeline.hpp>
#include <weir/composition/stream.hpp>
#include <weir/core/call_context.hpp>
#include <weir/core/error.hpp>
#include <weir/core/events.hpp>
#include <weir/core/outcome.hpp>
#include <weir/core/rate.hpp>
#include <weir/core/stage.hpp>
#include <weir/core/trace.hpp>
#include <weir/failure/backoff.hpp>
#include <weir/failure/circuit_breaker.hpp>
#include <weir/failure/fallback.hpp>
#include <weir/failure/hedging.hpp>
#include <weir/failure/retry.hpp>
#include <weir/failure/retry_budget.hpp>
#include <weir/failure/timeout.hpp>
#include <weir/observability/alerts.hpp>
#include <weir/observability/metrics.hpp>
#include <weir/throttling/adaptive_concurrency.hpp>
#include <weir/throttling/keyed_limiter.hpp>
#include <weir/throttling/rate_limits.hpp>
#include <weir/throttling/request_queue.hpp>
#include <weir/throttling/spend_budget.hpp>
#include <weir/throttling/token_bucket.hpp>
#include <weir/throttling/usage_monitor.hpp>
