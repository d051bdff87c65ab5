package main

// retry.go: retrying. Which failures are retryable and how long to wait
// (retryable, retryPolicy). The backoff, the cancellable sleep of every
// loop and the non-blocking wake-up send are in internal/backoff.

import (
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	docker "github.com/fsouza/go-dockerclient"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Retries. A deploy whose failure may pass by itself (the registry or
// Docker or etcd unreachable, a 5xx, a rate limit, a timeout, a registry
// that still serves the previous manifest) keeps its trigger revisions
// open: the node's watermark stays behind them, the queue deploys the job
// again after a capped exponential backoff with jitter, and a restart
// replays them too. A failure that will not pass by itself (a halted
// version, no local tag, a bad reference, an image the registry does not
// know or will not give us) is final: it is reported and the revisions
// are done. This file holds the one classification, retryable.

const (
	retryMin   = 2 * time.Second // first retry after 1-2 s
	retryMax   = 5 * time.Minute // no retry waits longer (Retry-After included)
	digestWait = 2 * time.Minute // how long a pushed digest may take to be served
)

// retryPolicy is the delay before the next attempt of a failed deploy:
// min, 2*min, 4*min, ... capped at max, each between 50% and 100% of its
// nominal value; a Retry-After visible in the error is waited out (up to
// max), plus up to 10% of jitter.
type retryPolicy struct {
	min, max time.Duration
}

func (p retryPolicy) delay(err error, attempt int) time.Duration {
	d := p.min
	for i := 1; i < attempt && d < p.max; i++ {
		d *= 2
	}
	d = min(d, p.max)
	d = d/2 + rand.N(d/2+1) //nolint:gosec // jitter, not a secret
	if ra, ok := retryAfter(err); ok {
		ra = min(ra, p.max)
		d = max(d, ra+rand.N(ra/10+1)) //nolint:gosec // jitter, not a secret
	}
	return d
}

// retryAfterError is an error that knows how long the server asked us to
// wait (an HTTP Retry-After).
type retryAfterError interface {
	RetryAfter() time.Duration
}

// retryAfterText finds a Retry-After a registry's answer left in an error
// message ("Retry-After: 30", "retry after 30s").
var retryAfterText = regexp.MustCompile(`(?i)retry[- _]after"?:?\s*"?(\d+)\s*(s|sec|seconds)?\b`)

// retryAfter returns the wait the server asked for, when the error shows one.
func retryAfter(err error) (time.Duration, bool) {
	if err == nil {
		return 0, false
	}
	var ra retryAfterError
	if errors.As(err, &ra) && ra.RetryAfter() > 0 {
		return ra.RetryAfter(), true
	}
	if m := retryAfterText.FindStringSubmatch(err.Error()); m != nil {
		if n, perr := strconv.Atoi(m[1]); perr == nil && n > 0 {
			return time.Duration(n) * time.Second, true
		}
	}
	return 0, false
}

// finalMessages are the registry and daemon answers that no retry will
// change: the image or tag does not exist, or we may not have it.
var finalMessages = []string{
	"manifest unknown",
	"not found",
	"name unknown",
	"unauthorized",
	"denied",
	"invalid reference",
	"no such image",
}

// retryMessages are answers that pass by themselves: an unreachable or
// overloaded registry, a rate limit.
var retryMessages = []string{
	"toomanyrequests",
	"too many requests",
	"service unavailable",
	"bad gateway",
	"gateway timeout",
	"internal server error",
	"connection refused",
	"connection reset",
	"no route to host",
	"i/o timeout",
	"timeout",
	"tls handshake",
	"eof",
	"temporary failure",
	"cannot connect",
	"is the docker daemon running",
}

// retryable reports whether err may pass by itself, so that the deploy
// that failed with it is worth trying again. A joined error is retryable
// when any part of it is. Unknown errors are retryable: a release must
// not be dropped because an error was not foreseen; the backoff bounds the
// cost.
func retryable(err error) bool {
	if err == nil {
		return false
	}
	if retry, ok := labelled(err); ok {
		return retry
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		for _, e := range j.Unwrap() {
			if retryable(e) {
				return true
			}
		}
		return false
	}
	switch {
	case errors.Is(err, errReplacement), errors.Is(err, errBadReference), errors.Is(err, errDigestGaveUp):
		return false // the version halted, or nothing to pull
	case errors.Is(err, errUnsupervised):
		return false // nothing would replace it next time either: retrying only stops it again
	case errors.Is(err, errDigestMismatch):
		return true
	case errors.Is(err, errDockerAway):
		return true // node-local: the replacement could not be judged (upwait.go)
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, docker.ErrConnectionRefused),
		errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.ECONNRESET):
		return true
	case errors.Is(err, context.Canceled):
		return true // cut short by a shutdown: the next start replays it
	}
	var ne net.Error
	if errors.As(err, &ne) {
		return true
	}
	var de *docker.Error
	if errors.As(err, &de) {
		switch {
		case de.Status == 429, de.Status >= 500 && !hasAny(de.Message, finalMessages):
			return true
		case de.Status >= 400:
			return false
		}
	}
	if errors.Is(err, docker.ErrNoSuchImage) { // the tag vanished between list and pull
		return false
	}
	var gs interface{ GRPCStatus() *status.Status }
	if errors.As(err, &gs) {
		switch gs.GRPCStatus().Code() {
		case codes.Unavailable, codes.DeadlineExceeded, codes.ResourceExhausted, codes.Aborted, codes.Canceled, codes.Unknown, codes.Internal:
			return true
		case codes.InvalidArgument, codes.PermissionDenied, codes.Unauthenticated, codes.FailedPrecondition, codes.NotFound, codes.OutOfRange:
			return false
		}
	}
	msg := err.Error()
	if hasAny(msg, retryMessages) {
		return true
	}
	if hasAny(msg, finalMessages) {
		return false
	}
	return true
}

// outcomes are the sentinels (errors.go) that decide a deploy's outcome
// whatever their cause, final ones first.
var outcomes = []struct {
	err   error
	retry bool
}{
	{errReplacement, false},  // the version halted
	{errBadReference, false}, // nothing to pull
	{errDigestGaveUp, false},
	{errUnsupervised, false},  // nothing would replace it next time either: retrying only stops it again
	{errCreateRefused, false}, // refused twice alike: it would be refused again
	{errDigestMismatch, true},
	{errDockerAway, true}, // node-local: the replacement could not be judged (upwait.go)
}

// labelled classifies err by the outcome sentinel that labels it, before
// any cause is looked at: the sentinel a chain of wraps ends in, or one
// named beside its cause (fmt.Errorf("%w: start app: %w", errReplacement,
// err)), so that a cause that would be retryable by itself (a Docker 500)
// does not make a failed replacement retryable. ok is false when no
// sentinel labels err; several failures joined are classified each alone.
func labelled(err error) (retry, ok bool) {
	for err != nil {
		parts := []error{err}
		if j, multi := err.(interface{ Unwrap() []error }); multi {
			parts = j.Unwrap()
		}
		for _, o := range outcomes {
			for _, p := range parts {
				if isSentinel(p) && errors.Is(p, o.err) {
					return o.retry, true
				}
			}
		}
		err = errors.Unwrap(err) // nil after several parts
	}
	return false, false
}

// isSentinel reports whether err wraps nothing: a sentinel itself, not an
// error about one.
func isSentinel(err error) bool {
	_, multi := err.(interface{ Unwrap() []error })
	return !multi && errors.Unwrap(err) == nil
}

// quietRetry reports whether err is only pushed digests not served yet:
// a registry's propagation delay, normal for a few seconds after a push.
// Such a retry is not announced; only giving up after digestWait is.
func quietRetry(err error) bool {
	if err == nil {
		return false
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		for _, e := range j.Unwrap() {
			if !quietRetry(e) {
				return false
			}
		}
		return len(j.Unwrap()) > 0
	}
	return errors.Is(err, errDigestMismatch)
}

func hasAny(s string, subs []string) bool {
	s = strings.ToLower(s)
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}
