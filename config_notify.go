package main

// config_notify.go: the flags of notifications beyond the Slack webhook:
// -notify (any number of service URLs), -notify_per_node, and Slack's bot
// token and channel for one thread per rollout.

import (
	"errors"
	"flag"
	"fmt"
	"net/url"
	"strings"

	"github.com/nicholas-fedor/shoutrrr/pkg/router"
)

// notifyConfig is the part of config that says whom to tell.
type notifyConfig struct {
	// NotifyURLs are shoutrrr service URLs (teams://, discord://, smtp://,
	// generic://, …); each holds its service's token: never shown.
	NotifyURLs []string
	// NotifyPerNode: every node also tells what it did, as the original
	// did, besides the one report per rollout.
	NotifyPerNode bool
	// SlackToken is a Slack bot token (xoxb-…): the rollout report is a
	// thread in SlackChannel, its parent message updated as nodes finish.
	SlackToken   string
	SlackChannel string
	// SlackAPI is Slack's Web API base URL (tests point it elsewhere).
	SlackAPI string
}

// notifyURLs collects repeated -notify flags.
type notifyURLs struct{ urls *[]string }

// String shows how many URLs there are, never the URLs (-h prints it).
func (n notifyURLs) String() string {
	if n.urls == nil || len(*n.urls) == 0 {
		return ""
	}
	return fmt.Sprintf("%d URLs", len(*n.urls))
}

func (n notifyURLs) Set(s string) error {
	*n.urls = append(*n.urls, s)
	return nil
}

// addNotifyFlags defines -notify, -notify_per_node, -slack_token,
// -slack_channel and -slack_api on fs.
func addNotifyFlags(fs *flag.FlagSet, c *notifyConfig) {
	fs.Var(notifyURLs{&c.NotifyURLs}, "notify", "notification service URL (shoutrrr form: teams://, discord://, mattermost://, googlechat://, ntfy://, telegram://, smtp://, generic://…); may be given several times; each gets the one report per rollout and failures at once")
	fs.BoolVar(&c.NotifyPerNode, "notify_per_node", c.NotifyPerNode, "also send every node's own message per deploy (the original's), besides the report per rollout")
	fs.StringVar(&c.SlackToken, "slack_token", c.SlackToken, "Slack bot token (default $SLACK_TOKEN): one thread per rollout in -slack_channel, its parent message updated as nodes finish")
	fs.StringVar(&c.SlackChannel, "slack_channel", c.SlackChannel, "Slack channel ID or name of the rollout threads (with -slack_token)")
	fs.StringVar(&c.SlackAPI, "slack_api", c.SlackAPI, "Slack Web API base URL")
}

// validate checks the notification flags without showing a URL's secret
// parts: an error names the URL by redactURL only. It returns the flag
// at fault.
func (c *notifyConfig) validate() (flagName string, err error) {
	for _, raw := range c.NotifyURLs {
		if err := checkNotifyURL(raw); err != nil {
			return "notify", err
		}
	}
	if c.SlackToken != "" && c.SlackChannel == "" {
		return "slack_channel", errors.New("must name a channel when -slack_token is set")
	}
	if u, err := url.Parse(c.SlackAPI); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "slack_api", errors.New("is not an http(s) URL")
	}
	return "", nil
}

// checkNotifyURL reports whether shoutrrr knows raw's service and accepts
// its configuration; the error shows neither the URL nor its token.
func checkNotifyURL(raw string) error {
	if scheme, _, _ := strings.Cut(raw, "://"); strings.EqualFold(scheme, "slack") {
		return fmt.Errorf("%s: use -slack_webhook_url or -slack_token for Slack", redactURL(raw))
	}
	if _, err := (&router.ServiceRouter{}).Locate(raw); err != nil {
		return fmt.Errorf("%s is not a notification URL of a known service (%w)", redactURL(raw), redactErr(err, raw))
	}
	return nil
}
