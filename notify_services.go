package main

// notify_services.go: the services of -notify (Microsoft Teams, Discord,
// Mattermost, Google Chat, ntfy, Telegram, e-mail, a generic JSON
// webhook, …) through shoutrrr, one sender per URL.

import (
	"context"
	"fmt"
	"log/slog"
	"strings"

	"github.com/nicholas-fedor/shoutrrr/pkg/router"
	"github.com/nicholas-fedor/shoutrrr/pkg/types"
)

// shoutrrrSender sends to one shoutrrr service URL. The URL holds the
// service's token: it appears in no log and no error.
type shoutrrrSender struct {
	url    string
	scheme string // teams, discord, generic, …
	svc    types.Service
}

// newShoutrrrSender sets up the service of raw; it sends nothing.
func newShoutrrrSender(raw string) (*shoutrrrSender, error) {
	svc, err := (&router.ServiceRouter{}).Locate(raw)
	if err != nil {
		return nil, fmt.Errorf("-notify %s: %w", redactURL(raw), redactErr(err, raw))
	}
	scheme, _, _ := strings.Cut(raw, "://")
	scheme, _, _ = strings.Cut(scheme, "+") // generic+https
	return &shoutrrrSender{url: raw, scheme: strings.ToLower(scheme), svc: svc}, nil
}

func (s *shoutrrrSender) service() string { return s.scheme }

// send delivers m within ctx. Shoutrrr's services take no context: the
// call runs in a goroutine of its own, and is given up (it ends with the
// service's own HTTP timeout) when ctx ends first.
func (s *shoutrrrSender) send(ctx context.Context, m message) error {
	params := types.Params{}
	if m.Title != "" && s.scheme != "generic" {
		params["title"] = m.Title
	}
	if s.scheme == "generic" {
		// The JSON webhook gets the fields as they are, with the title
		// and the message.
		for k, v := range m.Fields {
			params[k] = v
		}
		params["title"] = m.Title
	}
	done := make(chan error, 1)
	go func() { done <- s.svc.Send(m.Text, &params) }()
	select {
	case err := <-done:
		return redactErr(err, s.url)
	case <-ctx.Done():
		return fmt.Errorf("%s: %w", s.scheme, ctx.Err())
	}
}

// notifySenders builds a sender per configured service: the Slack
// incoming webhook, then each -notify URL.
func notifySenders(cfg config, log *slog.Logger) ([]sender, error) {
	var out []sender
	if cfg.SlackWebhookURL != "" {
		out = append(out, newSlackWebhook(cfg.SlackWebhookURL, cfg.SlackUsername, log))
	}
	for _, raw := range cfg.NotifyURLs {
		s, err := newShoutrrrSender(raw)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}
