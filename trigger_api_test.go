package main

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// hookRequest is one delivery to a trigger endpoint.
type hookRequest struct {
	method  string // default POST
	target  string
	headers map[string]string
	body    string
}

// serveHook sends req to handler and returns the status and the reply.
func serveHook(t *testing.T, handler http.HandlerFunc, req hookRequest) *httptest.ResponseRecorder {
	t.Helper()
	method := req.method
	if method == "" {
		method = "POST"
	}
	r := httptest.NewRequest(method, req.target, strings.NewReader(req.body))
	for k, v := range req.headers {
		r.Header.Set(k, v)
	}
	w := httptest.NewRecorder()
	handler(w, r)
	return w
}

// storedTrigger reads the trigger value at key, failing when there is none.
func storedTrigger(t *testing.T, cli *clientv3.Client, key string) trigger {
	t.Helper()
	resp, err := cli.Get(t.Context(), key)
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("get %s: %v (%d keys)", key, err, len(resp.Kvs))
	}
	var val trigger
	if err := json.Unmarshal(resp.Kvs[0].Value, &val); err != nil {
		t.Fatalf("value %q is not JSON: %v", resp.Kvs[0].Value, err)
	}
	return val
}

func TestParseImage(t *testing.T) {
	const dg = "sha256:8a9e9863dbb6e10edb5adfe917c00da84e1700fa76e7ed02476aa6e6fb8ee0d8"
	tests := []struct {
		in      string
		want    imagePush
		wantErr bool
	}{
		{"myorg/foo", imagePush{Repo: "myorg/foo"}, false},
		{"myorg/foo:qa", imagePush{Repo: "myorg/foo", Tag: "qa"}, false},
		{"127.0.0.1:5000/team/app:v1.2", imagePush{Repo: "127.0.0.1:5000/team/app", Tag: "v1.2"}, false},
		{"ghcr.io/o/app:v1@" + dg, imagePush{Repo: "ghcr.io/o/app", Tag: "v1", Digest: dg}, false},
		{"ghcr.io/o/app@" + dg, imagePush{}, true}, // which tag?
		{"", imagePush{}, true},
		{"MyOrg/Foo", imagePush{}, true},
		{"../x", imagePush{}, true},
		{"_nodes/n1", imagePush{}, true},
		{"a b", imagePush{}, true},
		{"foo:", imagePush{}, true},
	}
	for _, tt := range tests {
		got, err := parseImage(tt.in)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("parseImage(%q) = %+v, %v; want %+v (error %v)", tt.in, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestLowerRepo(t *testing.T) {
	for in, want := range map[string]string{
		"ghcr.io/Codertocat/Hello:V1": "ghcr.io/codertocat/hello:V1",
		"ghcr.io/Codertocat/hello:":   "ghcr.io/codertocat/hello:",
		"Host:5000/A/B":               "host:5000/a/b",
		"ghcr.io/A/b@sha256:AB":       "ghcr.io/a/b@sha256:AB",
	} {
		if got := lowerRepo(in); got != want {
			t.Errorf("lowerRepo(%q) = %q; want %q", in, got, want)
		}
	}
}

func TestAPIDeploy(t *testing.T) {
	cli := testEtcd(t)
	h, _ := newTestWebhook(t, cli, "s3cret")
	bearer := map[string]string{"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
	form := map[string]string{"Content-Type": "application/x-www-form-urlencoded"}
	tests := []struct {
		name    string
		req     hookRequest
		code    int
		key     string // under the prefix
		wantTag string
	}{
		{"json with tag", hookRequest{target: "/api/deploy", headers: bearer, body: `{"image":"127.0.0.1:5000/team/app:qa"}`}, 200, "/127.0.0.1:5000/team/app", "qa"},
		{"json without tag", hookRequest{target: "/api/deploy", headers: bearer, body: `{"image":"myorg/foo"}`}, 200, "/myorg/foo", ""},
		{"form with token", hookRequest{target: "/api/deploy?token=s3cret", headers: form, body: "image=ghcr.io%2Fo%2Fapp%3Av2"}, 200, "/ghcr.io/o/app", "v2"},
		{"wrong method", hookRequest{method: "GET", target: "/api/deploy", headers: bearer}, 405, "", ""},
		{"no secret", hookRequest{target: "/api/deploy", body: `{"image":"myorg/foo"}`}, 401, "", ""},
		{"wrong token", hookRequest{target: "/api/deploy?token=x", headers: form, body: "image=myorg/foo"}, 401, "", ""},
		{"too big", hookRequest{target: "/api/deploy", headers: bearer, body: `{"image":"` + strings.Repeat("a", 2<<20) + `"}`}, 413, "", ""},
		{"invalid JSON", hookRequest{target: "/api/deploy", headers: bearer, body: `{"image":`}, 400, "", ""},
		{"no image", hookRequest{target: "/api/deploy", headers: bearer, body: `{}`}, 400, "", ""},
		{"form without image", hookRequest{target: "/api/deploy?token=s3cret", headers: form, body: "repo=x"}, 400, "", ""},
		{"reserved name", hookRequest{target: "/api/deploy", headers: bearer, body: `{"image":"_nodes/n1/revision"}`}, 400, "", ""},
		{"upper case", hookRequest{target: "/api/deploy", headers: bearer, body: `{"image":"MyOrg/Foo:qa"}`}, 400, "", ""},
		{"dot dot", hookRequest{target: "/api/deploy", headers: bearer, body: `{"image":"../../x"}`}, 400, "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := serveHook(t, h.apiDeploy, tt.req)
			if w.Code != tt.code {
				t.Fatalf("status = %d; want %d (%s)", w.Code, tt.code, w.Body)
			}
			if tt.code != 200 {
				var e struct{ Error string }
				if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil || e.Error == "" {
					t.Errorf("body %q is not a JSON error", w.Body)
				}
				return
			}
			var got triggered
			if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil {
				t.Fatal(err)
			}
			if got.Key != h.prefix+tt.key || got.Revision == 0 || got.Tag != tt.wantTag {
				t.Errorf("reply = %+v; want key %s, tag %q and a revision", got, h.prefix+tt.key, tt.wantTag)
			}
			if val := storedTrigger(t, cli, got.Key); val.Tag != tt.wantTag || val.Source != "api" || val.Node != "n1" || val.Time.IsZero() {
				t.Errorf("stored %+v; want tag %q, source api, node n1, a time", val, tt.wantTag)
			}
		})
	}
	if n := countKeys(t, cli, h.prefix); n != 3 {
		t.Errorf("%d keys under %s; want the 3 accepted", n, h.prefix)
	}
}

func TestAPIDeployRecordsDigest(t *testing.T) {
	cli := testEtcd(t)
	h, _ := newTestWebhook(t, cli, "s")
	const dg = "sha256:3da1996a8115d7616457760d9920b815241d0a03b34cf5f04e9a0e9d8de37498"
	w := serveHook(t, h.apiDeploy, hookRequest{target: "/api/deploy?token=s", body: `{"image":"reg:5000/app:qa@` + dg + `"}`})
	if w.Code != 200 {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	if val := storedTrigger(t, cli, h.prefix+"/reg:5000/app"); val.Digest != dg || val.Tag != "qa" {
		t.Errorf("stored %+v; want tag qa and digest %s", val, dg)
	}
}

func TestNewEndpointsEtcdDownIs503(t *testing.T) {
	h, _ := newTestWebhook(t, failingKV{errors.New("etcdserver: request timed out")}, "s")
	for _, tt := range []struct {
		name    string
		handler http.HandlerFunc
		req     hookRequest
	}{
		{"api", h.apiDeploy, hookRequest{target: "/api/deploy?token=s", body: `{"image":"myorg/foo:qa"}`}},
		{"harbor", h.harbor, hookRequest{target: "/api/harbor/webhook?token=s", body: string(readFixture(t, "harbor-push-default.json"))}},
		{"github", h.gitHub, hookRequest{target: "/api/github/webhook?token=s", headers: map[string]string{"X-GitHub-Event": "registry_package"}, body: string(readFixture(t, "github-registry-package-published.json"))}},
		{"quay", h.quay, hookRequest{target: "/api/quay/webhook?token=s", body: string(readFixture(t, "quay-repository-push.json"))}},
	} {
		if w := serveHook(t, tt.handler, tt.req); w.Code != 503 {
			t.Errorf("%s: status %d; want 503 (%s)", tt.name, w.Code, w.Body)
		}
	}
}

func FuzzParseDeployRequest(f *testing.F) {
	f.Add("application/json", []byte(`{"image":"127.0.0.1:5000/team/app:qa"}`))
	f.Add("application/json", []byte(`{"image":"myorg/foo"}`))
	f.Add("application/x-www-form-urlencoded", []byte("image=ghcr.io%2Fo%2Fapp%3Av2"))
	f.Add("application/json", []byte(`{"image":"a/b:c@sha256:3da1996a8115d7616457760d9920b815241d0a03b34cf5f04e9a0e9d8de37498"}`))
	f.Fuzz(func(t *testing.T, contentType string, body []byte) {
		p, err := parseDeployRequest(contentType, body)
		if err != nil {
			return
		}
		checkPushSafe(t, p)
	})
}

// checkPushSafe asserts what every accepted push must satisfy.
func checkPushSafe(t *testing.T, p imagePush) {
	t.Helper()
	checkTriggerSafe(t, p.Repo)
	if checkTag(p.Tag) != nil {
		t.Fatalf("accepted invalid tag %q", p.Tag)
	}
	if checkDigest(p.Digest) != nil {
		t.Fatalf("accepted invalid digest %q", p.Digest)
	}
}

// checkPushes compares a parser's pushes and error with a table row's.
func checkPushes(t *testing.T, got []imagePush, err error, want []imagePush, wantErr bool) {
	t.Helper()
	if (err != nil) != wantErr {
		t.Fatalf("err = %v; want error %v", err, wantErr)
	}
	if len(got) != len(want) {
		t.Fatalf("got %+v; want %+v", got, want)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Errorf("push %d = %+v; want %+v", i, got[i], want[i])
		}
	}
}
