package main

import (
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestDaemonServesTriggerEndpoints goes through the daemon's own handler:
// each new endpoint is routed, authenticated and writes its trigger, and a
// Quay push deploys (pull, then stop) like any other trigger.
func TestDaemonServesTriggerEndpoints(t *testing.T) {
	const old, newer = "sha256:1111111111111111111111111111111111111111111111111111111111111111", "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	f := newFakeDocker()
	f.local["127.0.0.1:5000/myorg/foo:qa"] = old
	f.remote["127.0.0.1:5000/myorg/foo:qa"] = newer
	f.addContainer("foo", "127.0.0.1:5000/myorg/foo:qa")
	f.stopped = make(chan string, 1)
	f.supervise = true
	td := startTestDaemon(t, testEtcd(t), f, func(c *config) { c.WebhookSecret = "s3cret" })

	gh := string(readFixture(t, "github-registry-package-published.json"))
	for _, tt := range []struct {
		path    string
		headers map[string]string
		body    string
		code    int
		key     string
	}{
		{"/api/deploy", map[string]string{"Authorization": "Bearer s3cret"}, `{"image":"myorg/bar:v1"}`, 200, "/myorg/bar"},
		{"/api/deploy", nil, `{"image":"myorg/bar:v1"}`, 401, ""},
		{"/api/harbor/webhook", map[string]string{"Authorization": "Bearer s3cret"}, string(readFixture(t, "harbor-push-default.json")), 200, "/hub.harbor.com/test-webhook/debian"},
		{"/api/github/webhook", map[string]string{"X-GitHub-Event": "registry_package", "X-Hub-Signature-256": sign("s3cret", gh)}, gh, 200, "/ghcr.io/codertocat/hello-world"},
		{"/api/github/webhook", map[string]string{"X-GitHub-Event": "registry_package", "X-Hub-Signature-256": sign("other", gh)}, gh, 401, ""},
		{"/api/quay/webhook?token=s3cret", nil, `{"docker_url":"127.0.0.1:5000/myorg/foo","updated_tags":["qa"]}`, 200, "/127.0.0.1:5000/myorg/foo"},
	} {
		req, _ := http.NewRequestWithContext(t.Context(), "POST", td.base+tt.path, strings.NewReader(tt.body))
		for k, v := range tt.headers {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tt.code {
			t.Errorf("POST %s: %d; want %d", tt.path, resp.StatusCode, tt.code)
			continue
		}
		if tt.key != "" {
			storedTrigger(t, testEtcd(t), testPrefix(t)+tt.key)
		}
	}
	select {
	case name := <-f.stopped:
		if name != "foo" {
			t.Errorf("stopped %q; want foo", name)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the Quay push stopped nothing within 10s")
	}
}
