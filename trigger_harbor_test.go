package main

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestParseHarbor(t *testing.T) {
	const dg = "sha256:8a9e9863dbb6e10edb5adfe917c00da84e1700fa76e7ed02476aa6e6fb8ee0d8"
	tests := []struct {
		name    string
		body    string
		want    []imagePush
		wantErr bool
	}{
		{"default format", string(readFixture(t, "harbor-push-default.json")), []imagePush{
			{Repo: "hub.harbor.com/test-webhook/debian", Tag: "latest", Digest: dg},
		}, false},
		{"cloudevents format", string(readFixture(t, "harbor-push-cloudevents.json")), []imagePush{
			{Repo: "harbor.dev/library/busybox", Tag: "1.36", Digest: "sha256:dde8e930c7b6a490f728e66292bc9bce42efc9bbb5278bae40e4f30f6e00fe8c"},
		}, false},
		{"harbor 1.10 pushImage", strings.Replace(string(readFixture(t, "harbor-push-default.json")), "PUSH_ARTIFACT", "pushImage", 1), []imagePush{
			{Repo: "hub.harbor.com/test-webhook/debian", Tag: "latest", Digest: dg},
		}, false},
		{"cloudevents pull", string(readFixture(t, "harbor-pull-cloudevents.json")), nil, false},
		{"default pull", strings.Replace(string(readFixture(t, "harbor-push-default.json")), "PUSH_ARTIFACT", "PULL_ARTIFACT", 1), nil, false},
		{"harbor 1.10 pullImage", strings.Replace(string(readFixture(t, "harbor-push-default.json")), "PUSH_ARTIFACT", "pullImage", 1), nil, false},
		{"scan completed", `{"type":"SCANNING_COMPLETED","event_data":{"resources":[{"tag":"x","resource_url":"h.io/a/b:x"}]}}`, nil, false},
		{"cloudevents type in default shape", `{"type":"harbor.artifact.pushed","event_data":{"resources":[{"tag":"x","resource_url":"h.io/a/b:x"}]}}`, nil, false},
		{"push by digest", `{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"digest":"` + dg + `","tag":"","resource_url":"h.io/a/b@` + dg + `"}]}}`, nil, false},
		{"push by digest, digest as tag", `{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"digest":"` + dg + `","tag":"` + dg + `","resource_url":"h.io/a/b@` + dg + `"}]}}`, nil, false},
		{"tag from resource_url, bad digest dropped", `{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"digest":"md5:x","resource_url":"h.io/a/b:v2"}]}}`, []imagePush{{Repo: "h.io/a/b", Tag: "v2"}}, false},
		{"two tags, one repeated", `{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"tag":"a","resource_url":"h.io/p/r:a"},{"tag":"b","resource_url":"h.io/p/r:b"},{"tag":"a","resource_url":"h.io/p/r:a"}]}}`, []imagePush{{Repo: "h.io/p/r", Tag: "a"}, {Repo: "h.io/p/r", Tag: "b"}}, false},
		// A pushed tag that names no valid repository is refused whole,
		// like every trigger's (checkPush).
		{"no host", `{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"tag":"a","resource_url":"p/r:a"}]}}`, nil, true},
		{"pushImage, no host", `{"type":"pushImage","event_data":{"resources":[{"tag":"a","resource_url":"p/r"}]}}`, nil, true},
		{"scheme", `{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"tag":"a","resource_url":"https://h.io/p/r:a"}]}}`, nil, true},
		{"upper case", `{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"tag":"a","resource_url":"h.io/P/R:a"}]}}`, nil, true},
		{"bad tag", `{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"tag":"a b","resource_url":"h.io/p/r"}]}}`, nil, true},
		{"dot dot", `{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"tag":"a","resource_url":"h.io/../r:a"}]}}`, nil, true},
		{"one good, one bad", `{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"tag":"a","resource_url":"h.io/p/r:a"},{"tag":"a","resource_url":"p/r:a"}]}}`, nil, true},
		{"cloudevents, no host", `{"specversion":"1.0","type":"harbor.artifact.pushed","data":{"resources":[{"tag":"a","resource_url":"p/r:a"}]}}`, nil, true},
		{"no type", `{"event_data":{"resources":[{"tag":"a","resource_url":"h.io/p/r:a"}]}}`, nil, true},
		{"invalid JSON", `{"type":`, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseHarbor([]byte(tt.body))
			checkPushes(t, got, err, tt.want, tt.wantErr)
		})
	}
}

func TestHarborWebhook(t *testing.T) {
	cli := testEtcd(t)
	h, _ := newTestWebhook(t, cli, "s3cret")
	auth := map[string]string{"Authorization": "Bearer s3cret"}
	tests := []struct {
		name string
		req  hookRequest
		code int
		keys []string
	}{
		{"default", hookRequest{target: "/api/harbor/webhook", headers: auth, body: string(readFixture(t, "harbor-push-default.json"))}, 200, []string{"/hub.harbor.com/test-webhook/debian"}},
		{"cloudevents with token", hookRequest{target: "/api/harbor/webhook?token=s3cret", headers: map[string]string{"Content-Type": "application/cloudevents+json"}, body: string(readFixture(t, "harbor-push-cloudevents.json"))}, 200, []string{"/harbor.dev/library/busybox"}},
		{"pull ignored", hookRequest{target: "/api/harbor/webhook", headers: auth, body: string(readFixture(t, "harbor-pull-cloudevents.json"))}, 200, nil},
		{"no auth", hookRequest{target: "/api/harbor/webhook", body: string(readFixture(t, "harbor-push-default.json"))}, 401, nil},
		{"wrong auth", hookRequest{target: "/api/harbor/webhook", headers: map[string]string{"Authorization": "Bearer x"}, body: string(readFixture(t, "harbor-push-default.json"))}, 401, nil},
		{"get", hookRequest{method: "GET", target: "/api/harbor/webhook", headers: auth}, 405, nil},
		{"too big", hookRequest{target: "/api/harbor/webhook", headers: auth, body: `{"x":"` + strings.Repeat("a", 2<<20) + `"}`}, 413, nil},
		{"invalid JSON", hookRequest{target: "/api/harbor/webhook", headers: auth, body: `{"type":`}, 400, nil},
		{"harbor 1.10 pushImage", hookRequest{target: "/api/harbor/webhook", headers: auth, body: `{"type":"pushImage","event_data":{"resources":[{"tag":"v1.0","resource_url":"10.194.32.23/myproj/alpine:v1.0"}]}}`}, 200, []string{"/10.194.32.23/myproj/alpine"}},
		{"no host", hookRequest{target: "/api/harbor/webhook", headers: auth, body: `{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"tag":"a","resource_url":"p/r:a"}]}}`}, 400, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := serveHook(t, h.harbor, tt.req)
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
				if tr.Revision == 0 {
					t.Errorf("no revision in %+v", tr)
				}
			}
			if strings.Join(keys, ",") != strings.Join(tt.keys, ",") {
				t.Errorf("triggered %q; want %q", keys, tt.keys)
			}
		})
	}
	val := storedTrigger(t, cli, h.prefix+"/harbor.dev/library/busybox")
	if val.Tag != "1.36" || val.Source != "harbor" || val.Digest != "sha256:dde8e930c7b6a490f728e66292bc9bce42efc9bbb5278bae40e4f30f6e00fe8c" {
		t.Errorf("stored %+v; want tag 1.36, source harbor and the digest", val)
	}
	if n := countKeys(t, cli, h.prefix); n != 3 {
		t.Errorf("%d keys under %s; want the 3 pushes", n, h.prefix)
	}
}

func FuzzParseHarbor(f *testing.F) {
	f.Add(readFixture(f, "harbor-push-default.json"))
	f.Add(readFixture(f, "harbor-push-cloudevents.json"))
	f.Add(readFixture(f, "harbor-pull-cloudevents.json"))
	f.Add(readFixture(f, "peer/goharbor/v1.10-pushimage-alpine.json"))
	f.Add(readFixture(f, "peer/goharbor/default-push-by-digest.json"))
	f.Add(readFixture(f, "peer/keel/harbor-pushimage-no-host.json"))
	f.Add([]byte(`{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"tag":"a","resource_url":"h.io/_x/r:a"}]}}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		pushes, err := parseHarbor(body)
		if err != nil {
			return
		}
		for _, p := range pushes {
			checkPushSafe(t, p)
			if !hasDomain(p.Repo) || p.Tag == "" {
				t.Fatalf("accepted push %+v without host or tag", p)
			}
		}
	})
}
