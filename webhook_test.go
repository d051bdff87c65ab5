package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/etcdc"
)

func readFixture(tb testing.TB, name string) []byte {
	tb.Helper()
	b, err := os.ReadFile("testdata/" + name)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// recordingTransport answers every request with 200 and remembers it.
type recordingTransport struct {
	mu   sync.Mutex
	reqs []*http.Request
	body []string
	got  chan struct{}
}

func (rt *recordingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	b, _ := io.ReadAll(r.Body)
	rt.mu.Lock()
	rt.reqs = append(rt.reqs, r)
	rt.body = append(rt.body, string(b))
	rt.mu.Unlock()
	if rt.got != nil {
		rt.got <- struct{}{}
	}
	return &http.Response{StatusCode: 200, Body: io.NopCloser(strings.NewReader("")), Header: http.Header{}}, nil
}

// newTestWebhook returns the webhook handlers writing through kv: an etcd
// client is confined to the test's prefix (as newDaemon confines it), so
// that the test reads whole keys through it; a fake is used as it is.
func newTestWebhook(t *testing.T, kv kvPutter, secret string) (*webhook, *recordingTransport) {
	return newTestWebhookUnder(t, kv, testPrefix(t), secret)
}

func newTestWebhookUnder(t *testing.T, kv kvPutter, prefix, secret string) (*webhook, *recordingTransport) {
	if cli, ok := kv.(*clientv3.Client); ok {
		kv = etcdc.InPrefix(cli, prefix)
	}
	rt := &recordingTransport{got: make(chan struct{}, 10)}
	h := newWebhook(kv, prefix, func() string { return secret }, "n1", nil, testLogger(t), newMetrics())
	h.now = func() time.Time { return time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC) }
	h.callback = &http.Client{Transport: rt}
	return h, rt
}

func countKeys(t *testing.T, cli *clientv3.Client, prefix string) int64 {
	t.Helper()
	resp, err := cli.Get(t.Context(), prefix+"/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	return resp.Count
}

func hubBody(repo, tag string) string {
	b, _ := json.Marshal(map[string]any{
		"push_data":  map[string]any{"tag": tag, "pushed_at": 1.417566161e+09},
		"repository": map[string]any{"repo_name": repo},
	})
	return string(b)
}

func TestDockerHubWebhookRejects(t *testing.T) {
	cli := testEtcd(t)
	h, _ := newTestWebhook(t, cli, "s3cret")
	tests := []struct {
		name   string
		method string
		target string
		auth   string
		body   string
		code   int
	}{
		{"wrong method", "GET", "/hook", "Bearer s3cret", "", 405},
		{"no secret", "POST", "/hook", "", hubBody("myorg/foo", "qa"), 401},
		{"wrong secret", "POST", "/hook", "Bearer nope", hubBody("myorg/foo", "qa"), 401},
		{"wrong token", "POST", "/hook?token=nope", "", hubBody("myorg/foo", "qa"), 401},
		{"invalid JSON", "POST", "/hook", "Bearer s3cret", "{", 400},
		{"2 MiB body", "POST", "/hook", "Bearer s3cret", `{"x":"` + strings.Repeat("a", 2<<20) + `"}`, 413},
		{"empty repo", "POST", "/hook", "Bearer s3cret", hubBody("", "qa"), 400},
		{"dot dot", "POST", "/hook", "Bearer s3cret", hubBody("../../_coreos.com/fleet/x", ""), 400},
		{"star", "POST", "/hook", "Bearer s3cret", hubBody("*", ""), 400},
		{"upper case", "POST", "/hook", "Bearer s3cret", hubBody("MyOrg/Foo", ""), 400},
		{"reserved", "POST", "/hook", "Bearer s3cret", hubBody("_nodes/n1/revision", ""), 400},
		{"bad tag", "POST", "/hook", "Bearer s3cret", hubBody("myorg/foo", "a b"), 400},
		{"no repository", "POST", "/hook", "Bearer s3cret", `{"push_data":{"tag":"x"}}`, 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := httptest.NewRequest(tt.method, tt.target, strings.NewReader(tt.body))
			if tt.auth != "" {
				req.Header.Set("Authorization", tt.auth)
			}
			w := httptest.NewRecorder()
			h.dockerHub(w, req)
			if w.Code != tt.code {
				t.Errorf("status = %d; want %d (body %s)", w.Code, tt.code, w.Body)
			}
			var e struct{ Error string }
			if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil || e.Error == "" {
				t.Errorf("body %q is not a JSON error", w.Body)
			}
		})
	}
	if n := countKeys(t, cli, h.prefix); n != 0 {
		t.Errorf("%d keys written under %s; want none", n, h.prefix)
	}
}

func TestDockerHubWebhookWritesTrigger(t *testing.T) {
	cli := testEtcd(t)
	h, rt := newTestWebhook(t, cli, "s3cret")
	for _, auth := range []struct{ target, header string }{{"/hook", "Bearer s3cret"}, {"/hook?token=s3cret", ""}} {
		req := httptest.NewRequest("POST", auth.target, strings.NewReader(string(readFixture(t, "dockerhub-webhook.json"))))
		if auth.header != "" {
			req.Header.Set("Authorization", auth.header)
		}
		w := httptest.NewRecorder()
		h.dockerHub(w, req)
		if w.Code != 200 {
			t.Fatalf("status = %d; want 200 (%s)", w.Code, w.Body)
		}
		var got triggered
		if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil {
			t.Fatal(err)
		}
		if got.Key != h.prefix+"/myorg/foo" || got.Revision == 0 || got.Tag != "qa" {
			t.Errorf("reply = %+v; want key %s/myorg/foo, tag qa and a revision", got, h.prefix)
		}
		resp, err := cli.Get(t.Context(), got.Key)
		if err != nil || len(resp.Kvs) != 1 {
			t.Fatalf("get %s: %v %v", got.Key, resp, err)
		}
		var val trigger
		if err := json.Unmarshal(resp.Kvs[0].Value, &val); err != nil {
			t.Fatalf("value %q is not JSON: %v", resp.Kvs[0].Value, err)
		}
		if val.Tag != "qa" || val.Source != "dockerhub" || val.Time.IsZero() || val.Node != "n1" {
			t.Errorf("value = %+v; want tag qa, source dockerhub, a time and the node", val)
		}
	}
	// The fixture's callback_url is on Docker Hub: it gets the result.
	<-rt.got
	h.wg.Wait()
	rt.mu.Lock()
	defer rt.mu.Unlock()
	if len(rt.reqs) != 2 || rt.reqs[0].URL.Host != "registry.hub.docker.com" || !strings.Contains(rt.body[0], `"state":"success"`) {
		t.Errorf("callbacks = %d to %v, body %q; want 2 success posts to registry.hub.docker.com", len(rt.reqs), rt.reqs[0].URL, rt.body)
	}
}

func TestDockerHubCallbackOnlyToDockerHub(t *testing.T) {
	h, rt := newTestWebhook(t, testEtcd(t), "")
	for _, u := range []string{
		"http://registry.hub.docker.com/u/x/hook/1/", // not https
		"https://169.254.169.254/latest/meta-data",
		"https://registry.hub.docker.com.evil.example/hook",
		"https://registry.hub.docker.com:8443/hook",
		"https://127.0.0.1/hook",
	} {
		h.dockerHubCallback(t.Context(), u, "success", "x")
	}
	h.wg.Wait()
	if len(rt.reqs) != 0 {
		t.Errorf("posted %d callbacks to %v; want none outside Docker Hub", len(rt.reqs), rt.reqs[0].URL)
	}
}

// failingKV is an etcd that cannot be written.
type failingKV struct{ err error }

func (f failingKV) Put(context.Context, string, string, ...clientv3.OpOption) (*clientv3.PutResponse, error) {
	return nil, f.err
}

func (f failingKV) Txn(context.Context) clientv3.Txn { return failingTxn(f) }

// failingTxn is a transaction that etcd refuses at commit.
type failingTxn struct{ err error }

func (t failingTxn) If(...clientv3.Cmp) clientv3.Txn  { return t }
func (t failingTxn) Then(...clientv3.Op) clientv3.Txn { return t }
func (t failingTxn) Else(...clientv3.Op) clientv3.Txn { return t }
func (t failingTxn) Commit() (*clientv3.TxnResponse, error) {
	return nil, t.err
}

var _ kvPutter = failingKV{}

func TestWebhookEtcdDownIs503(t *testing.T) {
	h, rt := newTestWebhook(t, failingKV{errors.New("etcdserver: request timed out")}, "s")
	w := httptest.NewRecorder()
	h.dockerHub(w, httptest.NewRequest("POST", "/hook?token=s", strings.NewReader(string(readFixture(t, "dockerhub-webhook.json")))))
	if w.Code != 503 {
		t.Errorf("dockerhub status = %d; want 503", w.Code)
	}
	<-rt.got
	h.wg.Wait()
	if len(rt.body) != 1 || !strings.Contains(rt.body[0], `"state":"error"`) {
		t.Errorf("callback bodies %q; want one error state", rt.body)
	}
	w = httptest.NewRecorder()
	h.registry(w, httptest.NewRequest("POST", "/reg?token=s", strings.NewReader(string(readFixture(t, "registry-notification-manifest-push.json")))))
	if w.Code != 503 {
		t.Errorf("registry status = %d; want 503", w.Code)
	}
}

func TestRegistryWebhook(t *testing.T) {
	cli := testEtcd(t)
	h, _ := newTestWebhook(t, cli, "s3cret")
	tests := []struct {
		name string
		body string
		code int
		keys []string
	}{
		{"manifest push", string(readFixture(t, "registry-notification-manifest-push.json")), 200, []string{"/localhost:5000/myorg/foo"}},
		{"blob push only", string(readFixture(t, "registry-notification-blob-push.json")), 200, nil},
		{"pull", `{"events":[{"action":"pull","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","repository":"a","tag":"t"},"request":{"host":"r:5000"}}]}`, 200, nil},
		{"push by digest", `{"events":[{"action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","repository":"a"},"request":{"host":"r:5000"}}]}`, 200, nil},
		{"bad repository", `{"events":[{"action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","repository":"../x","tag":"t"},"request":{"host":"r:5000"}}]}`, 400, nil},
		{"host that is no registry host", `{"events":[{"action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","repository":"a","tag":"t"},"request":{"host":"registry"}}]}`, 400, nil},
		{"empty envelope", `{"events":[]}`, 200, nil},
		{"no events", `{}`, 400, nil},
		{"events null", `{"events":null}`, 400, nil},
		{"events not a list", `{"events":{}}`, 400, nil},
		{"jfrog", `{"domain":"docker","event_type":"pushed","data":{"image_name":"library/ubuntu","tag":"latest"}}`, 400, nil},
		{"azure container registry", `{"action":"push","target":{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","repository":"hello-world","tag":"v1"},"request":{"host":"myregistry.azurecr.io"}}`, 200, []string{"/myregistry.azurecr.io/hello-world"}},
		{"azure container registry ping", `{"action":"ping","target":{"repository":"hello-world","tag":"v1"},"request":{"host":"myregistry.azurecr.io"}}`, 200, nil},
		{"invalid JSON", `{"events":`, 400, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := httptest.NewRequest("POST", "/reg", strings.NewReader(tt.body))
			req.Header.Set("Authorization", "Bearer s3cret")
			req.Header.Set("Content-Type", "application/vnd.docker.distribution.events.v2+json")
			w := httptest.NewRecorder()
			h.registry(w, req)
			if w.Code != tt.code {
				t.Fatalf("status = %d; want %d (%s)", w.Code, tt.code, w.Body)
			}
			if tt.code != 200 {
				return
			}
			var got struct{ Triggered []triggered }
			if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil {
				t.Fatal(err)
			}
			var keys []string
			for _, tr := range got.Triggered {
				keys = append(keys, strings.TrimPrefix(tr.Key, h.prefix))
			}
			if strings.Join(keys, ",") != strings.Join(tt.keys, ",") {
				t.Errorf("triggered %q; want %q", keys, tt.keys)
			}
		})
	}
	if n := countKeys(t, cli, h.prefix); n != 2 {
		t.Errorf("%d keys under %s; want only the manifest push's and ACR's", n, h.prefix)
	}
	req := httptest.NewRequest("POST", "/reg", strings.NewReader(`{"events":[]}`))
	w := httptest.NewRecorder()
	h.registry(w, req)
	if w.Code != 401 {
		t.Errorf("registry without secret: %d; want 401", w.Code)
	}
}

// checkTriggerSafe asserts what every accepted repository must satisfy: it
// is a valid name and its key stays under the prefix, outside the reserved
// names.
func checkTriggerSafe(t *testing.T, repo string) {
	if err := checkRepoName(repo); err != nil {
		t.Fatalf("accepted invalid repository %q: %v", repo, err)
	}
	got, ok := repoFromKey(triggerKey(repo))
	if !ok || got != repo {
		t.Fatalf("repository %q does not round-trip through its key (%q, %v)", repo, got, ok)
	}
}

func FuzzParseDockerHub(f *testing.F) {
	f.Add(readFixture(f, "dockerhub-webhook.json"))
	f.Add([]byte(hubBody("../x", "")))
	f.Add([]byte(hubBody("a/b", "v1.2")))
	f.Add([]byte(`{"repository":{"repo_name":"_x"}}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		p, err := parseDockerHub(body)
		if err != nil {
			return
		}
		checkTriggerSafe(t, p.Repo)
		if checkTag(p.Tag) != nil {
			t.Fatalf("accepted invalid tag %q", p.Tag)
		}
	})
}

func FuzzParseRegistryEnvelope(f *testing.F) {
	f.Add(readFixture(f, "registry-notification-manifest-push.json"))
	f.Add(readFixture(f, "registry-notification-blob-push.json"))
	f.Add(readFixture(f, "peer/keel/azure-acr-push.json"))
	f.Add(readFixture(f, "peer/keel/jfrog-docker-pushed.json"))
	f.Add([]byte(`{"events":[{"action":"push","target":{"mediaType":"application/vnd.oci.image.index.v1+json","repository":"a/b","tag":"t"},"request":{"host":"h:1"}}]}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		pushes, err := parseRegistryEnvelope(body)
		if err != nil {
			return
		}
		for _, p := range pushes {
			checkTriggerSafe(t, p.Repo)
			if !hasDomain(p.Repo) || p.Tag == "" || checkTag(p.Tag) != nil {
				t.Fatalf("accepted push %+v without host or valid tag", p)
			}
		}
	})
}
