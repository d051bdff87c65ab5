package main

// notify.go: the report of a deploy, its text, and the hub that sends
// messages to every configured service (the Slack webhook, -notify URLs)
// without ever blocking a deploy.

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

// tellAtOnce reports whether a node tells this report by itself when
// only the reports per rollout are sent (no -notify_per_node): a failure
// (at once, not only in the rollout's report), a recovery from one, and a
// dry run's findings, none of which a rollout report covers.
func (r report) tellAtOnce() bool {
	// Waiting is set only on the node that recorded the held version
	// first (hold.go): the fleet says it once.
	return r.failed() || r.Retrying || r.Recovered > 0 || r.DryRun || len(r.Waiting) > 0
}

// message is one notification as every service gets it.
type message struct {
	Title string // one line; services with a title show it
	Text  string // the body: plain text (Slack's emoji codes kept)
	// Fields go to the generic JSON webhook as they are: "kind"
	// ("node", "failure", "rollout"), "image", "image_id", "digest", …
	Fields map[string]string
}

// sender delivers one message to one service. send returns an error that
// never shows the service's URL.
type sender interface {
	// service names the service in logs and metrics ("slack",
	// "teams", "generic", …), never its URL.
	service() string
	// send delivers m within ctx's deadline.
	send(ctx context.Context, m message) error
}

// notifyHub sends messages to every configured service from its own
// goroutine, so that a slow or failing service never holds up a deploy;
// the rollout reporter (rolloutreport.go) delivers through it too.
type notifyHub struct {
	senders []sender
	perNode bool // -notify_per_node: every node's own message too
	queue   chan message
	log     *slog.Logger
	metrics *metrics
	timeout time.Duration // one delivery to one service, rate-limit waits included
}

// newNotifyHub returns the hub of senders; it starts nothing.
func newNotifyHub(senders []sender, perNode bool, log *slog.Logger, m *metrics) *notifyHub {
	return &notifyHub{senders: senders, perNode: perNode, queue: make(chan message, 100), log: log, metrics: m, timeout: 2 * time.Minute}
}

// nodeMessage is a node's report as a message.
func nodeMessage(r report) message {
	kind := "node"
	if r.failed() {
		kind = "failure"
	}
	return message{Title: "deployer: " + r.Repo + " on " + r.Node, Text: r.text(),
		Fields: map[string]string{"kind": kind, "node": r.Node, "repository": r.Repo}}
}

// notify queues what a deploy did on this node, when it is to be told
// (tellAtOnce, or every report with -notify_per_node); it never blocks.
func (h *notifyHub) notify(r report) {
	if !h.perNode && !r.tellAtOnce() {
		return
	}
	h.enqueue(nodeMessage(r))
}

// enqueue queues m; it never blocks. When the queue is full (services
// down for long), m is dropped and logged.
func (h *notifyHub) enqueue(m message) {
	select {
	case h.queue <- m:
	default:
		for _, s := range h.senders {
			h.count(s, "dropped")
		}
		h.log.Warn("notification queue full, message dropped", "text", m.Text)
	}
}

// say queues one message of the fleet's (a rollback, a pin, a canary
// rollout's news) for every service; it never blocks.
func (h *notifyHub) say(text string) {
	h.enqueue(message{Title: "deployer", Text: text, Fields: map[string]string{"kind": "fleet"}})
}

func (h *notifyHub) count(s sender, result string) {
	h.metrics.notifications.WithLabelValues(s.service(), result).Inc()
	if s.service() == "slack" {
		h.metrics.slackPosts.WithLabelValues(result).Inc()
	}
}

// run sends queued messages until ctx is done, then sends what is still
// queued within a short bound.
func (h *notifyHub) run(ctx context.Context) error {
	for {
		select {
		case m := <-h.queue:
			_ = h.deliver(ctx, m)
		case <-ctx.Done():
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 3*time.Second)
			defer cancel()
			for {
				select {
				case m := <-h.queue:
					_ = h.deliver(dctx, m)
				default:
					return nil
				}
			}
		}
	}
}

// deliver sends m to every service now, each within h.timeout; it returns
// the failures joined (already logged), nil when every service took it.
func (h *notifyHub) deliver(ctx context.Context, m message) error {
	var errs []error
	for _, s := range h.senders {
		sctx, cancel := context.WithTimeout(ctx, h.timeout)
		err := s.send(sctx, m)
		cancel()
		if err != nil {
			h.count(s, "error")
			h.log.Warn("notification not sent", "service", s.service(), "err", err)
			errs = append(errs, fmt.Errorf("%s: %w", s.service(), err))
			continue
		}
		h.count(s, "ok")
	}
	return errors.Join(errs...)
}

// slackWebhook posts to a Slack incoming webhook through slack-go.
type slackWebhook struct {
	url      string // the token: never shown
	username string
	client   *http.Client
	log      *slog.Logger
	maxWait  time.Duration // longest Retry-After honoured
}

func newSlackWebhook(url, username string, log *slog.Logger) *slackWebhook {
	return &slackWebhook{url: url, username: username, client: &http.Client{Timeout: 10 * time.Second}, log: log, maxWait: time.Minute}
}

func (s *slackWebhook) service() string { return "slack" }

// send posts one message, waiting out rate limits (429 with Retry-After)
// up to three times.
func (s *slackWebhook) send(ctx context.Context, m message) error {
	msg := slack.WebhookMessage{Username: s.username, Text: m.Text}
	for attempt := 1; ; attempt++ {
		// The URL is the token: errors (*url.Error) must not carry it.
		err := redactErr(slack.PostWebhookCustomHTTPContext(ctx, s.url, s.client, &msg), s.url)
		if err == nil {
			return nil
		}
		var rl *slack.RateLimitedError
		if errors.As(err, &rl) && attempt < 3 && ctx.Err() == nil {
			wait := min(max(rl.RetryAfter, time.Second), s.maxWait)
			s.log.Info("slack rate limited, waiting", "retry_after", wait)
			if backoff.Sleep(ctx, wait) {
				continue
			}
		}
		return err
	}
}
