package main

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestParseQuay(t *testing.T) {
	tests := []struct {
		name    string
		body    string
		want    []imagePush
		wantErr bool
	}{
		{"red hat quay docs", string(readFixture(t, "quay-repository-push.json")), []imagePush{{Repo: "quay.io/dgangaia/test", Tag: "latest"}}, false},
		{"2013 map of tags", string(readFixture(t, "quay-repository-push-2013.json")), []imagePush{{Repo: "quay.io/devtable/ubuntu", Tag: "latest"}}, false},
		{"several tags", `{"docker_url":"quay.example.com:8443/ns/app","updated_tags":["v2","latest","v2"]}`, []imagePush{{Repo: "quay.example.com:8443/ns/app", Tag: "v2"}, {Repo: "quay.example.com:8443/ns/app", Tag: "latest"}}, false},
		{"no tags", `{"docker_url":"quay.io/ns/app","updated_tags":[]}`, nil, false},
		{"no docker_url", `{"repository":"ns/app","updated_tags":["x"]}`, nil, true},
		{"not a push: docker_url not checked", `{"docker_url":"ns/app","tags":["x"],"vulnerability":{}}`, nil, false},
		{"docker_url without host", `{"docker_url":"ns/app","updated_tags":["x"]}`, nil, true},
		{"docker_url with tag", `{"docker_url":"quay.io/ns/app:x","updated_tags":["x"]}`, nil, true},
		{"upper case", `{"docker_url":"quay.io/NS/app","updated_tags":["x"]}`, nil, true},
		{"bad tag", `{"docker_url":"quay.io/ns/app","updated_tags":["a b"]}`, nil, true},
		{"updated_tags a string", `{"docker_url":"quay.io/ns/app","updated_tags":"x"}`, nil, true},
		{"invalid JSON", `{"docker_url":`, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseQuay([]byte(tt.body))
			checkPushes(t, got, err, tt.want, tt.wantErr)
		})
	}
}

func TestQuayWebhook(t *testing.T) {
	cli := testEtcd(t)
	h, _ := newTestWebhook(t, cli, "s3cret")
	body := string(readFixture(t, "quay-repository-push.json"))
	for _, tt := range []struct {
		name string
		req  hookRequest
		code int
	}{
		{"no token", hookRequest{target: "/api/quay/webhook", body: body}, 401},
		{"wrong token", hookRequest{target: "/api/quay/webhook?token=nope", body: body}, 401},
		{"get", hookRequest{method: "GET", target: "/api/quay/webhook?token=s3cret"}, 405},
		{"too big", hookRequest{target: "/api/quay/webhook?token=s3cret", body: `{"x":"` + strings.Repeat("a", 2<<20) + `"}`}, 413},
		{"bad repository", hookRequest{target: "/api/quay/webhook?token=s3cret", body: `{"docker_url":"quay.io/../x","updated_tags":["a"]}`}, 400},
	} {
		if w := serveHook(t, h.quay, tt.req); w.Code != tt.code {
			t.Errorf("%s: status %d; want %d (%s)", tt.name, w.Code, tt.code, w.Body)
		}
	}
	if n := countKeys(t, cli, h.prefix); n != 0 {
		t.Fatalf("%d keys written by refused deliveries", n)
	}
	w := serveHook(t, h.quay, hookRequest{target: "/api/quay/webhook?token=s3cret", body: body})
	if w.Code != 200 {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	var got struct{ Triggered []triggered }
	if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil || len(got.Triggered) != 1 || got.Triggered[0].Key != h.prefix+"/quay.io/dgangaia/test" || got.Triggered[0].Revision == 0 {
		t.Fatalf("reply %s; want one trigger for quay.io/dgangaia/test with a revision", w.Body)
	}
	if val := storedTrigger(t, cli, got.Triggered[0].Key); val.Tag != "latest" || val.Source != "quay" || val.Digest != "" {
		t.Errorf("stored %+v; want tag latest, source quay, no digest", val)
	}
}

func FuzzParseQuay(f *testing.F) {
	f.Add(readFixture(f, "quay-repository-push.json"))
	f.Add(readFixture(f, "quay-repository-push-2013.json"))
	f.Add([]byte(`{"docker_url":"quay.io/_ns/app","updated_tags":["v2"]}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		pushes, err := parseQuay(body)
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
