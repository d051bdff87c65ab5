package main

// notify_slackthread.go: Slack's Web API with a bot token (-slack_token),
// through slack-go: a rollout is one thread, its parent message updated
// as nodes finish, each node's part a reply (rolloutreport.go decides
// who posts what).

import (
	"context"
	"fmt"

	"github.com/slack-go/slack"
)

// slackThreads posts and updates messages in one channel.
type slackThreads struct {
	api      *slack.Client
	token    string // never shown
	channel  string
	username string
}

// newSlackThreads returns the poster of -slack_channel with token,
// through the Web API at apiURL; it calls nothing.
func newSlackThreads(token, channel, username, apiURL string) *slackThreads {
	return &slackThreads{api: slack.New(token, slack.OptionAPIURL(apiURL)), token: token, channel: channel, username: username}
}

// post posts text in the channel, as a reply in threadTS when it is set
// (shown in the channel too with broadcast); it returns the message's
// channel ID and timestamp.
func (s *slackThreads) post(ctx context.Context, text, threadTS string, broadcast bool) (channel, ts string, err error) {
	opts := []slack.MsgOption{slack.MsgOptionText(text, false), slack.MsgOptionUsername(s.username)}
	if threadTS != "" {
		opts = append(opts, slack.MsgOptionTS(threadTS))
		if broadcast {
			opts = append(opts, slack.MsgOptionBroadcast())
		}
	}
	channel, ts, err = s.api.PostMessageContext(ctx, s.channel, opts...)
	if err != nil {
		return "", "", fmt.Errorf("slack chat.postMessage: %w", redactErr(err, s.token))
	}
	return channel, ts, nil
}

// update replaces the text of the message ts in channel.
func (s *slackThreads) update(ctx context.Context, channel, ts, text string) error {
	if _, _, _, err := s.api.UpdateMessageContext(ctx, channel, ts, slack.MsgOptionText(text, false)); err != nil {
		return fmt.Errorf("slack chat.update: %w", redactErr(err, s.token))
	}
	return nil
}
