package main

// notify.go: the report of a deploy, its text, and the Slack notifier
// that posts it without ever blocking a deploy.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/slack-go/slack"

	"github.com/die-net/deployer/internal/backoff"
)

// report is what one node did for one repository.
type report struct {
	Node    string
	Repo    string // familiar repository name
	Tags    []tagReport
	Stopped []staleContainer
	Failed  []error  // failures other than pulls: listing, inspecting, stopping
	Held    []string // stale containers left alone, with the reason
	Waiting []string // new versions a freeze or window holds, told by the node that recorded them (hold.go)
	DryRun  bool     // stale containers were found, not stopped
	Stale   []staleContainer

	Retrying  bool      // failed, and will be tried again (retry.go)
	Recovered int       // this deploy succeeded after that many failed attempts
	Since     time.Time // when the first of those failed
}

type tagReport struct {
	Tag     string
	OldID   string
	NewID   string
	PullErr error
}

// err joins every failure, pulls included; nil when nothing failed.
func (r report) err() error {
	errs := slices.Clone(r.Failed)
	for _, t := range r.Tags {
		if t.PullErr != nil {
			errs = append(errs, t.PullErr)
		}
	}
	return errors.Join(errs...)
}

// failed reports whether anything went wrong.
func (r report) failed() bool {
	if len(r.Failed) > 0 {
		return true
	}
	for _, t := range r.Tags {
		if t.PullErr != nil {
			return true
		}
	}
	return false
}

// worthTelling is false for a deploy that changed nothing and failed at
// nothing: a pull that found the image up to date.
func (r report) worthTelling() bool {
	if r.failed() || r.Recovered > 0 || len(r.Stopped) > 0 || len(r.Stale) > 0 || len(r.Held) > 0 || len(r.Waiting) > 0 {
		return true
	}
	for _, t := range r.Tags {
		if t.OldID != t.NewID {
			return true
		}
	}
	return false
}

// text renders the report as one Slack message: the node, the image, old
// and new image IDs, and the containers stopped; failures marked as such.
func (r report) text() string {
	var b strings.Builder
	verb := "Deploying"
	switch {
	case r.failed():
		verb = ":x: FAILED deploying"
	case r.DryRun:
		verb = "Dry run:"
	}
	fmt.Fprintf(&b, "%s %s on %s", verb, r.Repo, r.Node)
	switch {
	case r.Retrying:
		b.WriteString(" (will retry until it works; only the recovery will be told)")
	case r.Recovered > 0:
		fmt.Fprintf(&b, " (recovered after %d failed attempts since %s)", r.Recovered, r.Since.UTC().Format(time.RFC3339))
	}
	for _, t := range r.Tags {
		switch {
		case t.PullErr != nil:
			fmt.Fprintf(&b, "\n• %s:%s pull failed: %v", r.Repo, t.Tag, t.PullErr)
		case t.OldID != t.NewID:
			fmt.Fprintf(&b, "\n• %s:%s %s → %s", r.Repo, t.Tag, shortID(t.OldID), shortID(t.NewID))
		default:
			fmt.Fprintf(&b, "\n• %s:%s up to date (%s)", r.Repo, t.Tag, shortID(t.NewID))
		}
	}
	if len(r.Stale) > 0 {
		fmt.Fprintf(&b, "\nwould restart: %s", containerNames(r.Stale))
	}
	if len(r.Stopped) > 0 {
		fmt.Fprintf(&b, "\nstopped: %s", containerNames(r.Stopped))
	}
	if len(r.Held) > 0 {
		fmt.Fprintf(&b, "\nheld back: %s", strings.Join(r.Held, ", "))
	}
	for _, w := range r.Waiting {
		fmt.Fprintf(&b, "\n• %s", w)
	}
	for _, f := range r.Failed {
		fmt.Fprintf(&b, "\n• failed: %v", f)
	}
	return b.String()
}

func containerNames(cs []staleContainer) string {
	names := make([]string, len(cs))
	for i, c := range cs {
		names[i] = fmt.Sprintf("%s (%s → %s)", c.Name, shortID(c.ImageID), shortID(c.NewID))
	}
	return strings.Join(names, ", ")
}

// slackNotifier posts reports to a Slack incoming webhook from its own
// goroutine, so that a slow or failing Slack never holds up a deploy.
type slackNotifier struct {
	url      string
	username string
	client   *http.Client
	queue    chan slack.WebhookMessage
	log      *slog.Logger
	metrics  *metrics
	maxWait  time.Duration // longest Retry-After honoured
}

func newSlackNotifier(url, username string, log *slog.Logger, m *metrics) *slackNotifier {
	return &slackNotifier{
		url:      url,
		username: username,
		client:   &http.Client{Timeout: 10 * time.Second},
		queue:    make(chan slack.WebhookMessage, 100),
		log:      log,
		metrics:  m,
		maxWait:  time.Minute,
	}
}

// notify queues a report; it never blocks. When the queue is full (Slack
// down for long), the report is dropped and logged.
func (s *slackNotifier) notify(r report) {
	msg := slack.WebhookMessage{Username: s.username, Text: r.text()}
	select {
	case s.queue <- msg:
	default:
		s.metrics.slackPosts.WithLabelValues("dropped").Inc()
		s.log.Warn("slack queue full, message dropped", "text", msg.Text)
	}
}

// say queues one message of the fleet's (a rollback, a pin), posted as
// a report is; it never blocks.
func (s *slackNotifier) say(text string) {
	select {
	case s.queue <- slack.WebhookMessage{Username: s.username, Text: text}:
	default:
		s.metrics.slackPosts.WithLabelValues("dropped").Inc()
		s.log.Warn("slack queue full, message dropped", "text", text)
	}
}

// run posts queued messages until ctx is done, then posts what is still
// queued within a short bound.
func (s *slackNotifier) run(ctx context.Context) error {
	for {
		select {
		case msg := <-s.queue:
			s.post(ctx, msg)
		case <-ctx.Done():
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 3*time.Second)
			defer cancel()
			for {
				select {
				case msg := <-s.queue:
					s.post(dctx, msg)
				default:
					return nil
				}
			}
		}
	}
}

// post sends one message, waiting out rate limits (429 with Retry-After)
// up to three times.
func (s *slackNotifier) post(ctx context.Context, msg slack.WebhookMessage) {
	for attempt := 1; ; attempt++ {
		// The URL is the token: errors (*url.Error) must not carry it.
		err := redactErr(slack.PostWebhookCustomHTTPContext(ctx, s.url, s.client, &msg), s.url)
		if err == nil {
			s.metrics.slackPosts.WithLabelValues("ok").Inc()
			return
		}
		var rl *slack.RateLimitedError
		if errors.As(err, &rl) && attempt < 3 && ctx.Err() == nil {
			wait := min(max(rl.RetryAfter, time.Second), s.maxWait)
			s.log.Info("slack rate limited, waiting", "retry_after", wait)
			if backoff.Sleep(ctx, wait) {
				continue
			}
		}
		s.metrics.slackPosts.WithLabelValues("error").Inc()
		s.log.Warn("slack post failed", "err", err)
		return
	}
}
