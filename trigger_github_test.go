package main

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/url"
	"strings"
	"testing"
)

// sign computes GitHub's X-Hub-Signature-256 value, independently of the
// code under test.
func sign(secret, body string) string {
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(body))
	return "sha256=" + hex.EncodeToString(mac.Sum(nil))
}

const ghDigest = "sha256:3da1996a8115d7616457760d9920b815241d0a03b34cf5f04e9a0e9d8de37498"

func TestParseGitHub(t *testing.T) {
	tagged := string(readFixture(t, "github-registry-package-published.json"))
	asPackage := strings.Replace(tagged, `"registry_package":`, `"package":`, 1)
	want := []imagePush{{Repo: "ghcr.io/codertocat/hello-world", Tag: "v1.2.0", Digest: ghDigest}}
	tests := []struct {
		name    string
		event   string
		body    string
		want    []imagePush
		wantErr bool
	}{
		{"registry_package published", "registry_package", tagged, want, false},
		{"package published", "package", asPackage, want, false},
		{"event header and body disagree", "package", tagged, nil, false},
		{"untagged", "package", string(readFixture(t, "github-package-published-untagged.json")), nil, false},
		{"ping", "ping", string(readFixture(t, "github-ping.json")), nil, false},
		{"push event", "push", `{"ref":"refs/heads/main"}`, nil, false},
		{"updated", "registry_package", strings.Replace(tagged, `"published"`, `"updated"`, 1), nil, false},
		{"npm package", "registry_package", strings.Replace(tagged, `"package_type": "CONTAINER"`, `"package_type": "npm"`, 1), nil, false},
		{"lower-case package type", "registry_package", strings.Replace(tagged, `"package_type": "CONTAINER"`, `"package_type": "container"`, 1), want, false},
		{"bad tag", "registry_package", strings.Replace(tagged, `"name": "v1.2.0"`, `"name": "v1 2"`, 1), nil, true},
		{"no host", "registry_package", strings.Replace(tagged, `"package_url": "ghcr.io/`, `"package_url": "`, 1), nil, true},
		{"reserved name", "registry_package", strings.Replace(tagged, `"package_url": "ghcr.io/Codertocat/`, `"package_url": "ghcr.io/../`, 1), nil, true},
		{"invalid JSON", "package", `{"action":`, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseGitHub(tt.event, []byte(tt.body))
			checkPushes(t, got, err, tt.want, tt.wantErr)
		})
	}
}

func TestGitHubWebhook(t *testing.T) {
	cli := testEtcd(t)
	h, _ := newTestWebhook(t, cli, "s3cret")
	body := string(readFixture(t, "github-registry-package-published.json"))
	event := func(name, sig string) map[string]string {
		m := map[string]string{"X-GitHub-Event": name, "Content-Type": "application/json", "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958"}
		if sig != "" {
			m["X-Hub-Signature-256"] = sig
		}
		return m
	}
	refused := []struct {
		name string
		req  hookRequest
		code int
	}{
		{"no signature", hookRequest{target: "/api/github/webhook", headers: event("registry_package", ""), body: body}, 401},
		{"signed with another secret", hookRequest{target: "/api/github/webhook", headers: event("registry_package", sign("other", body)), body: body}, 401},
		{"signature of another body", hookRequest{target: "/api/github/webhook", headers: event("registry_package", sign("s3cret", body+" ")), body: body}, 401},
		{"sha1 signature only", hookRequest{target: "/api/github/webhook", headers: map[string]string{"X-GitHub-Event": "registry_package", "X-Hub-Signature": "sha1=0000"}, body: body}, 401},
		{"not hex", hookRequest{target: "/api/github/webhook", headers: event("registry_package", "sha256=zz"), body: body}, 401},
		{"wrong token", hookRequest{target: "/api/github/webhook?token=x", headers: event("registry_package", ""), body: body}, 401},
		{"get", hookRequest{method: "GET", target: "/api/github/webhook", headers: event("ping", "")}, 405},
		{"too big", hookRequest{target: "/api/github/webhook", headers: event("registry_package", ""), body: strings.Repeat("a", 2<<20)}, 413},
		{"no event header", hookRequest{target: "/api/github/webhook", headers: map[string]string{"X-Hub-Signature-256": sign("s3cret", body)}, body: body}, 400},
		{"bad JSON", hookRequest{target: "/api/github/webhook", headers: event("package", sign("s3cret", "{")), body: "{"}, 400},
	}
	for _, tt := range refused {
		if w := serveHook(t, h.gitHub, tt.req); w.Code != tt.code {
			t.Errorf("%s: status %d; want %d (%s)", tt.name, w.Code, tt.code, w.Body)
		}
	}
	ping := string(readFixture(t, "github-ping.json"))
	untagged := string(readFixture(t, "github-package-published-untagged.json"))
	for _, tt := range []struct {
		name string
		req  hookRequest
	}{
		{"ping", hookRequest{target: "/api/github/webhook", headers: event("ping", sign("s3cret", ping)), body: ping}},
		{"untagged", hookRequest{target: "/api/github/webhook", headers: event("package", sign("s3cret", untagged)), body: untagged}},
		{"other event", hookRequest{target: "/api/github/webhook", headers: event("push", sign("s3cret", `{}`)), body: `{}`}},
	} {
		w := serveHook(t, h.gitHub, tt.req)
		if w.Code != 200 || strings.TrimSpace(w.Body.String()) != `{"triggered":[]}` {
			t.Errorf("%s: %d %s; want 200 and nothing triggered", tt.name, w.Code, w.Body)
		}
	}
	if n := countKeys(t, cli, h.prefix); n != 0 {
		t.Fatalf("%d keys written; want none yet", n)
	}

	form := url.Values{"payload": {body}}.Encode()
	for _, tt := range []struct {
		name string
		req  hookRequest
	}{
		{"signed JSON", hookRequest{target: "/api/github/webhook", headers: event("registry_package", sign("s3cret", body)), body: body}},
		{"signed form", hookRequest{target: "/api/github/webhook", headers: map[string]string{"X-GitHub-Event": "registry_package", "Content-Type": "application/x-www-form-urlencoded", "X-Hub-Signature-256": sign("s3cret", form)}, body: form}},
		{"token", hookRequest{target: "/api/github/webhook?token=s3cret", headers: event("registry_package", ""), body: body}},
	} {
		w := serveHook(t, h.gitHub, tt.req)
		var got struct{ Triggered []triggered }
		if w.Code != 200 || json.Unmarshal(w.Body.Bytes(), &got) != nil || len(got.Triggered) != 1 || got.Triggered[0].Key != h.prefix+"/ghcr.io/codertocat/hello-world" {
			t.Errorf("%s: %d %s; want one trigger for ghcr.io/codertocat/hello-world", tt.name, w.Code, w.Body)
		}
	}
	if val := storedTrigger(t, cli, h.prefix+"/ghcr.io/codertocat/hello-world"); val.Tag != "v1.2.0" || val.Digest != ghDigest || val.Source != "github" {
		t.Errorf("stored %+v; want tag v1.2.0, the digest, source github", val)
	}
}

func TestGitHubSignature(t *testing.T) {
	body := []byte(`{"zen":"x"}`)
	good := sign("k", string(body))
	for _, tt := range []struct {
		header, secret string
		want           bool
	}{
		{good, "k", true},
		{good, "", false}, // no secret: nothing can be signed
		{strings.ToUpper(good[:7]) + good[7:], "k", false},
		{strings.TrimPrefix(good, "sha256="), "k", false},
		{good[:len(good)-2], "k", false},
		{"", "k", false},
	} {
		if got := gitHubSignature(tt.header, body, tt.secret); got != tt.want {
			t.Errorf("gitHubSignature(%q, secret %q) = %v; want %v", tt.header, tt.secret, got, tt.want)
		}
	}
}

func FuzzParseGitHub(f *testing.F) {
	f.Add("registry_package", readFixture(f, "github-registry-package-published.json"))
	f.Add("package", readFixture(f, "github-package-published-untagged.json"))
	f.Add("ping", readFixture(f, "github-ping.json"))
	f.Add("package", []byte(`{"action":"published","package":{"package_type":"CONTAINER","package_version":{"package_url":"ghcr.io/A/_b:t","container_metadata":{"tag":{"name":"t","digest":"sha256:x"}}}}}`))
	f.Fuzz(func(t *testing.T, event string, body []byte) {
		pushes, err := parseGitHub(event, body)
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
