package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// webhookRecorder is a generic JSON webhook that records the bodies.
type webhookRecorder struct {
	*httptest.Server
	mu     sync.Mutex
	bodies []map[string]string
}

func newWebhookRecorder(t testing.TB) *webhookRecorder {
	w := &webhookRecorder{}
	w.Server = httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		var body map[string]string
		if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
			http.Error(rw, "bad json", http.StatusBadRequest)
			return
		}
		w.mu.Lock()
		w.bodies = append(w.bodies, body)
		w.mu.Unlock()
	}))
	t.Cleanup(w.Close)
	return w
}

func (w *webhookRecorder) got() []map[string]string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]map[string]string(nil), w.bodies...)
}

// genericURL is the -notify URL of the recorder's JSON webhook.
func (w *webhookRecorder) genericURL() string {
	return "generic://" + strings.TrimPrefix(w.URL, "http://") + "/hook?template=json&disabletls=yes"
}

func TestGenericWebhookGetsTheFields(t *testing.T) {
	rec := newWebhookRecorder(t)
	s, err := newShoutrrrSender(rec.genericURL())
	if err != nil {
		t.Fatal(err)
	}
	m := summarize(rolledOut(), []string{"n1", "n2", "n3"}).message()
	if err := s.send(t.Context(), m); err != nil {
		t.Fatal(err)
	}
	got := rec.got()
	if len(got) != 1 {
		t.Fatalf("%d bodies; want 1", len(got))
	}
	for k, want := range map[string]string{"kind": "rollout", "outcome": "rolled out", "done": "3", "image": "127.0.0.1:5000/myorg/app:qa",
		"message": m.Text, "title": m.Title, "version": "3"} {
		if got[0][k] != want {
			t.Errorf("body[%q] = %q; want %q", k, got[0][k], want)
		}
	}
}

// TestNotifyURLsNeverShown: a -notify URL's token appears in no error
// (a refused URL, a failed send) and no log line of the hub.
func TestNotifyURLsNeverShown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()
	const token = "SECRETtoken0123456789"
	tests := []struct {
		name string
		url  string
		send bool // the URL is valid: send to it (it fails)
	}{
		{"generic, token in the path", "generic://" + closed + "/hooks/" + token + "?template=json&disabletls=yes", true},
		{"generic, token in the query", "generic+http://" + closed + "/hook?token=" + token, true},
		{"ntfy, password", "ntfy://user:" + token + "@" + closed + "/topic?scheme=http", true},
		{"mattermost", "mattermost://" + closed + "/" + token + "?disabletls=yes", true},
		{"discord, bad", "discord://" + token + "@", false},
		{"teams, bad", "teams://" + token + "@tenant", false},
		{"unknown service", "nosuch://" + token + "@host/" + token, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var logs strings.Builder
			log := newLogger("text", &syncWriter{w: &logs})
			s, err := newShoutrrrSender(tt.url)
			if !tt.send {
				if err == nil {
					t.Fatalf("newShoutrrrSender accepted %s", tt.name)
				}
				if strings.Contains(err.Error(), token) {
					t.Errorf("error shows the token: %v", err)
				}
				_, cerr := parseFlags("deployer", []string{"-notify", tt.url}, env(), io.Discard)
				if cerr == nil || !errors.Is(cerr, errInvalidFlag) || strings.Contains(cerr.Error(), token) {
					t.Errorf("parseFlags -notify = %v; want an invalid flag without the token", cerr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			h := newNotifyHub([]sender{s}, false, log, newMetrics())
			h.timeout = 5 * time.Second
			err = h.deliver(context.Background(), message{Text: "hello", Title: "t"})
			if err == nil {
				t.Fatal("a send to a closed port succeeded")
			}
			if strings.Contains(err.Error(), token) || strings.Contains(logs.String(), token) {
				t.Errorf("the token shows:\nerr: %v\nlog: %s", err, logs.String())
			}
			if !strings.Contains(logs.String(), "notification not sent") {
				t.Errorf("no failure logged:\n%s", logs.String())
			}
		})
	}
}

// TestNodeMessagesPerNodeOrNot: without -notify_per_node a node tells
// only what the rollout's report does not: failures, recoveries, dry
// runs.
func TestNodeMessagesPerNodeOrNot(t *testing.T) {
	changed := report{Node: "n1", Repo: "r", Tags: []tagReport{{Tag: "qa", OldID: "a", NewID: "b"}}}
	tests := []struct {
		name    string
		r       report
		perNode bool
		want    bool
	}{
		{"converged", changed, false, false},
		{"converged, per node", changed, true, true},
		{"pull failed", report{Node: "n1", Repo: "r", Tags: []tagReport{{Tag: "qa", PullErr: errors.New("x")}}}, false, true},
		{"failed", report{Node: "n1", Repo: "r", Failed: []error{errors.New("x")}}, false, true},
		{"recovered", func() report { r := changed; r.Recovered = 2; return r }(), false, true},
		{"dry run", report{Node: "n1", Repo: "r", DryRun: true, Stale: []staleContainer{{Name: "c"}}}, false, true},
		// The node that recorded a held version first says it, once for the fleet (hold.go).
		{"a version a freeze holds, recorded here first", report{Node: "n1", Repo: "r", Waiting: []string{"qa: frozen since …"}}, false, true},
		{"held back here, recorded elsewhere", report{Node: "n1", Repo: "r", Held: []string{"app (frozen)"}}, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := newNotifyHub(nil, tt.perNode, testLogger(t), newMetrics())
			h.notify(tt.r)
			if got := len(h.queue) == 1; got != tt.want {
				t.Errorf("queued = %v; want %v", got, tt.want)
			}
		})
	}
}

// TestRedactErrUserInfo: a token in a service URL's user or password is
// hidden wherever the service's error puts it (its API's path).
func TestRedactErrUserInfo(t *testing.T) {
	tests := []struct {
		url, msg, leak string
	}{
		{"telegram://110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw@telegram?chats=@ops",
			`Post "https://api.telegram.org/bot110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw/sendMessage": dial tcp: i/o timeout`, "AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"},
		{"discord://Sx3oO5VeW3Dkzh4oUtgL2e9vzbnrTEaGjobQP-4Ds@123456789",
			`Post "https://discord.com/api/webhooks/123456789/Sx3oO5VeW3Dkzh4oUtgL2e9vzbnrTEaGjobQP-4Ds": EOF`, "Sx3oO5VeW3Dkzh4oUtgL2e9vzbnrTEaGjobQP-4Ds"},
		{"smtp://deployer:s3cretPassw0rd@mail.example.com:587/?from=d@example.com&to=ops@example.com",
			"535 authentication failed for deployer:s3cretPassw0rd", "s3cretPassw0rd"},
	}
	for _, tt := range tests {
		err := redactErr(errors.New(tt.msg), tt.url)
		if strings.Contains(err.Error(), tt.leak) {
			t.Errorf("redactErr(%q) = %q; want %q hidden", tt.msg, err, tt.leak)
		}
	}
}

// TestNotifyURLExamples: every example URL of README's Notifications
// section is accepted by -notify.
func TestNotifyURLExamples(t *testing.T) {
	for _, u := range []string{
		"teams://11111111-4444-4444-8444-cccccccccccc@22222222-4444-4444-8444-cccccccccccc/33333333012222222222333333333344/44444444-4444-4444-8444-cccccccccccc/V2ESyij_gAljSoUQHvZoZYzlpAoAXExyOl26dlf1xHEx05?host=contoso.webhook.office.com",
		"discord://W3dE2OZz4C13_4z_uHfDOoC7BqTW288s-z1ykqI0iJnY@693853386302554172",
		"mattermost://mattermost.example.com/bywsw8zt5jgpte3nm65qjiru6h",
		"googlechat://chat.googleapis.com/v1/spaces/AAAAkE7yhyo/messages?key=AIzaSyDdI0hCZtE6vySjMm&token=wyWVs-KIn0",
		"ntfy://ntfy.sh/acme-deploys",
		"telegram://110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw@telegram?chats=@acme_ops",
		"smtp://deployer:s3cret@mail.example.com:587/?fromaddress=deployer@example.com&toaddresses=ops@example.com",
		"generic://hooks.example.com/deploys?template=json",
	} {
		if _, err := parseFlags("deployer", []string{"-notify", u}, env(), io.Discard); err != nil {
			t.Errorf("-notify %s: %v", redactURL(u), err)
		}
	}
}

func TestNotifyFlags(t *testing.T) {
	const token = "xoxb-111-222-SECRETbottoken"
	tests := []struct {
		name    string
		args    []string
		env     []string
		wantErr string // a substring; "" for none
		check   func(t *testing.T, c config)
	}{
		{"-notify twice", []string{"-notify", "ntfy://ntfy.sh/a", "-notify", "generic://h.example.com/x?template=json"}, nil, "", func(t *testing.T, c config) {
			if len(c.NotifyURLs) != 2 {
				t.Errorf("NotifyURLs = %d URLs; want 2", len(c.NotifyURLs))
			}
		}},
		{"slack token from the environment", []string{"-slack_channel", "C1"}, []string{"SLACK_TOKEN", token}, "", func(t *testing.T, c config) {
			if c.SlackToken != token || c.SlackChannel != "C1" {
				t.Errorf("SlackToken, SlackChannel = %q, %q; want the environment's and C1", c.SlackToken, c.SlackChannel)
			}
		}},
		{"a token without a channel", []string{"-slack_token", token}, nil, "-slack_channel: must name a channel", nil},
		{"slack through -notify", []string{"-notify", "slack://hook:T1/B2/xyzxyzxyz"}, nil, "use -slack_webhook_url or -slack_token", nil},
		{"bad -slack_api", []string{"-slack_api", "slack.com/api"}, nil, "-slack_api: is not an http(s) URL", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := parseFlags("deployer", tt.args, env(tt.env...), io.Discard)
			if tt.wantErr != "" {
				if err == nil || !errors.Is(err, errInvalidFlag) || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("parseFlags(%q) = %v; want an invalid flag: %s", tt.args, err, tt.wantErr)
				}
				if strings.Contains(err.Error(), "SECRET") || strings.Contains(err.Error(), "xyzxyz") {
					t.Errorf("the error shows a secret: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, c)
		})
	}
	// -h shows neither the environment's token nor a -notify URL.
	var help strings.Builder
	_, _ = parseFlags("deployer", []string{"-notify", "ntfy://u:Zq9pass@ntfy.sh/a", "-h"}, env("SLACK_TOKEN", token), &help)
	if strings.Contains(help.String(), "Zq9pass") || strings.Contains(help.String(), "SECRETbottoken") {
		t.Errorf("-h shows a secret:\n%s", help.String())
	}
}
