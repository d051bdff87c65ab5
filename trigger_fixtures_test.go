package main

import (
	"encoding/json"
	"io/fs"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// peerFixture is one delivery of a payload from testdata/peer (origins in
// testdata/README.md) to the endpoint its sender would use, with the
// answer the sender must get and what must be written.
type peerFixture struct {
	file     string // under testdata/peer/
	variant  string // a change the test makes to the stored bytes, for the subtest name
	edit     func([]byte) []byte
	endpoint string            // dockerhub, registry, harbor, quay, api, or github:<X-GitHub-Event>
	headers  map[string]string // replace the endpoint's usual authentication
	code     int
	pushes   []string // written, in order: "repo:tag", or "repo:tag@digest" where a digest is recorded
}

// peerFixtures is the expected outcome of every stored fixture. The rule
// (README, Triggers): a push by tag writes its trigger (200); a delivery
// that is not a push by tag writes nothing (200); a body that is not the
// endpoint's sender's, or a push by tag that names no valid repository or
// tag, writes nothing and answers 400, so that no sender sees a green
// delivery while nothing is deployed.
var peerFixtures = []peerFixture{
	// A published container tag with no package_url: which repository?
	{file: "argocd-image-updater/ghcr-no-package-url.json", endpoint: "github:package", code: 400},
	{file: "argocd-image-updater/harbor-actual-format-one-level.json", endpoint: "harbor", code: 200,
		pushes: []string{"harbor.example.com/image-name:tag@sha256:3e5e4ce59b8390414cf58806692fb716cc02d71f8a53b35ddeffdeb0c9aaf100"}},
	// Harbor never puts a scheme in resource_url (its ExtURL drops it):
	// refused, naming the form expected; the short digest would be dropped.
	{file: "argocd-image-updater/harbor-url-with-scheme.json", endpoint: "harbor", code: 400},
	{file: "argocd-image-updater/quay-docker-url-with-scheme.json", endpoint: "quay", code: 400},
	{file: "argocd-image-updater/quay-multiple-tags.json", endpoint: "quay", code: 200,
		pushes: []string{"quay.io/mynamespace/repository:latest", "quay.io/mynamespace/repository:v1.0"}},
	{file: "argocd-image-updater/quay-private-host.json", endpoint: "quay", code: 200,
		pushes: []string{"quay.apps.example.com/mynamespace/repository:dev"}},
	{file: "captures/dockerhub-y2khub-tag_game.json", endpoint: "dockerhub", code: 200, pushes: []string{"y2khub/tag_game:latest"}},
	{file: "captures/github-package-published-ghcr-multiarch.json", endpoint: "github:package", code: 200,
		pushes: []string{"ghcr.io/theryangeary/www:0e2a89b@sha256:89160c587d0c36bf54090497a465445c14980ba48efbcf3b0d03c49b76f3feb8"}},
	{file: "captures/github-package-published-ghcr-multiarch.json", variant: "form", endpoint: "github:package", code: 200,
		edit:    func(b []byte) []byte { return []byte(url.Values{"payload": {string(b)}}.Encode()) },
		headers: map[string]string{"Content-Type": "application/x-www-form-urlencoded"},
		pushes:  []string{"ghcr.io/theryangeary/www:0e2a89b@sha256:89160c587d0c36bf54090497a465445c14980ba48efbcf3b0d03c49b76f3feb8"}},
	{file: "captures/github-package-published-ghcr-multiarch.json", variant: "registry_package", endpoint: "github:registry_package", code: 200,
		edit: func(b []byte) []byte {
			return []byte(strings.Replace(string(b), `"package":`, `"registry_package":`, 1))
		},
		pushes: []string{"ghcr.io/theryangeary/www:0e2a89b@sha256:89160c587d0c36bf54090497a465445c14980ba48efbcf3b0d03c49b76f3feb8"}},
	{file: "captures/harbor-push-artifact-rumput.json", endpoint: "harbor", code: 200,
		pushes: []string{"hb.nicolas.my.id/library/rumput:v1@sha256:76525f02955aec223342400a080c73024c995c9db1ba2eabf7505cf3bdf3f1f0"}},
	// Harbor's auth header set to the bare secret, as this sender did:
	// the README says "Bearer SECRET"; a 401 shows it red.
	{file: "captures/harbor-push-artifact-rumput.json", variant: "bare secret", endpoint: "harbor", code: 401,
		headers: map[string]string{"Authorization": "s3cret"}},
	{file: "distribution/docs-envelope-push-by-digest.json", endpoint: "registry", code: 200},
	{file: "distribution/docs-manifest-pull-with-tag.json", endpoint: "registry", code: 200},
	{file: "distribution/event-test-envelope-push-by-digest.json", endpoint: "registry", code: 200},
	{file: "distribution/tag-delete-assembled.json", endpoint: "registry", code: 200},
	{file: "docker-docs/dockerhub-dhi-mirror-push.json", endpoint: "dockerhub", code: 200, pushes: []string{"exampleorg/dhi-python:3.13-alpine3.21"}},
	{file: "goharbor/cloudevents-pull-by-digest.json", endpoint: "harbor", code: 200},
	{file: "goharbor/cloudevents-push-assembled.json", endpoint: "harbor", code: 200,
		pushes: []string{"harbor.example.com/example/test:latest@sha256:d72f37f783ed6a8d58ac70b4db052707d1ec9d4ea010ef5ccd84652faf9ed844"}},
	{file: "goharbor/default-pull-artifact.json", endpoint: "harbor", code: 200},
	// A push without a tag: Harbor gives the digest as tag; nothing to deploy.
	{file: "goharbor/default-push-by-digest.json", endpoint: "harbor", code: 200},
	// Harbor 1.9/1.10's push: same body as PUSH_ARTIFACT.
	{file: "goharbor/v1.10-pushimage-alpine.json", endpoint: "harbor", code: 200,
		pushes: []string{"10.194.32.23/myproj/alpine:v1.0@sha256:bf1684a6e3676389ec861c602e97f27b03f14178e5bc3f70dce198f9f160cce9"}},
	// Azure Container Registry sends one distribution event, no envelope.
	{file: "keel/azure-acr-push.json", endpoint: "registry", code: 200,
		pushes: []string{"myregistry.azurecr.io/hello-world:v1@sha256:80f0d5c8786bb9e621a45ece0db56d11cdc624ad20da9fe62e9d25490f331d7d"}},
	{file: "keel/dockerhub-karolisr-keel.json", endpoint: "dockerhub", code: 200, pushes: []string{"karolisr/keel:0.1.7"}},
	{file: "keel/github-package-create.json", endpoint: "github:package", code: 200},
	// docker.pkg.github.com (retired): no container_metadata, no tag read.
	{file: "keel/github-registry-package-2019.json", endpoint: "github:registry_package", code: 200},
	// tag and resource_url disagree (Harbor builds one from the other, so
	// only a hand-made payload does this): the tag field wins, as before.
	{file: "keel/harbor-push-tag-vs-url.json", endpoint: "harbor", code: 200,
		pushes: []string{"quay.io/mynamespace/repository:latest@sha256:b4758aaed11c155a476b9857e1178f157759c99cb04c907a04993f5481eff848"}},
	{file: "keel/harbor-pushimage-ai-rag.json", endpoint: "harbor", code: 200,
		pushes: []string{"harbor.mydomain.com/library/ai-rag:1.2.3@sha256:b4758aaed11c155a476b9857e1178f157759c99cb04c907a04993f5481eff848"}},
	// A pushed tag whose resource_url has no registry host.
	{file: "keel/harbor-pushimage-no-host.json", endpoint: "harbor", code: 400},
	// JFrog Artifactory pointed at the registry endpoint: no envelope.
	{file: "keel/jfrog-docker-pushed.json", endpoint: "registry", code: 400},
	// keel's own format, sent where a CI pipeline would send it.
	{file: "keel/native-gcr-hello-world.json", endpoint: "api", code: 400},
	{file: "keel/native-gcr-hello-world.json", variant: "registry", endpoint: "registry", code: 400},
	{file: "keel/quay-mynamespace-repository.json", endpoint: "quay", code: 200, pushes: []string{"quay.io/mynamespace/repository:1.2.3"}},
	{file: "keel/registry-erxes.json", endpoint: "registry", code: 200,
		pushes: []string{"registry.git.erxes.io/foo/bar:1.6.1@sha256:4afff550708506c5b8b7384ad10d401a02b29ed587cb2730cb02753095b5178d"}},
	// GitHub's examples are untagged (and npm): nothing to deploy.
	{file: "octokit/package-published-docker.json", endpoint: "github:package", code: 200},
	{file: "octokit/ping.json", endpoint: "github:ping", code: 200},
	{file: "octokit/registry_package-published-docker.json", endpoint: "github:registry_package", code: 200},
	{file: "quay/quay-io-guide-repo_push-map.json", endpoint: "quay", code: 200, pushes: []string{"quay.io/mynamespace/repository:latest"}},
	// Quay's test notifications of other events: no updated_tags.
	{file: "quay/test-notification-build_success.json", endpoint: "quay", code: 200},
	{file: "quay/test-notification-repo_mirror_sync_success.json", endpoint: "quay", code: 200},
	{file: "quay/test-notification-repo_push.json", endpoint: "quay", code: 200, pushes: []string{"quay.io/foo/bar:latest", "quay.io/foo/bar:foo"}},
	{file: "quay/test-notification-vulnerability_found.json", endpoint: "quay", code: 200},
	{file: "zulip/harbor-delete-image.json", endpoint: "harbor", code: 200},
	{file: "zulip/harbor-push-image.json", endpoint: "harbor", code: 200,
		pushes: []string{"harbor.example.com/example/test:latest@sha256:d72f37f783ed6a8d58ac70b4db052707d1ec9d4ea010ef5ccd84652faf9ed844"}},
	{file: "zulip/harbor-replication.json", endpoint: "harbor", code: 200},
	{file: "zulip/harbor-scanning-completed.json", endpoint: "harbor", code: 200},
}

// peerRequest is the delivery of body to an endpoint as its sender makes
// it, authenticated with secret.
func peerRequest(h *webhook, endpoint, secret string, body []byte) (http.HandlerFunc, hookRequest) {
	bearer := map[string]string{"Authorization": "Bearer " + secret, "Content-Type": "application/json"}
	switch event, ok := strings.CutPrefix(endpoint, "github:"); {
	case ok:
		return h.gitHub, hookRequest{target: "/api/github/webhook", headers: map[string]string{
			"X-GitHub-Event": event, "X-Hub-Signature-256": sign(secret, string(body)), "Content-Type": "application/json",
		}}
	case endpoint == "dockerhub":
		return h.dockerHub, hookRequest{target: "/api/dockerhub/webhook", headers: bearer}
	case endpoint == "registry":
		return h.registry, hookRequest{target: "/api/registry/webhook", headers: bearer}
	case endpoint == "harbor":
		return h.harbor, hookRequest{target: "/api/harbor/webhook", headers: bearer}
	case endpoint == "quay":
		return h.quay, hookRequest{target: "/api/quay/webhook?token=" + secret}
	case endpoint == "api":
		return h.apiDeploy, hookRequest{target: "/api/deploy", headers: bearer}
	}
	panic("unknown endpoint " + endpoint)
}

// TestPeerFixtures sends every payload that other projects ship, or that
// was captured from a real delivery, to its endpoint: the answer and the
// triggers written are those of peerFixtures.
func TestPeerFixtures(t *testing.T) {
	cli := testEtcd(t)
	const secret = "s3cret"
	for _, tt := range peerFixtures {
		name := tt.file
		if tt.variant != "" {
			name += "/" + tt.variant
		}
		t.Run(name, func(t *testing.T) {
			h, _ := newTestWebhook(t, cli, secret)
			t.Cleanup(h.Close)
			body := readFixture(t, "peer/"+tt.file)
			if tt.edit != nil {
				body = tt.edit(body)
			}
			handler, req := peerRequest(h, tt.endpoint, secret, body)
			req.body = string(body)
			for k, v := range tt.headers {
				req.headers[k] = v
			}
			w := serveHook(t, handler, req)
			if w.Code != tt.code {
				t.Fatalf("POST %s to %s: %d %s; want %d", tt.file, tt.endpoint, w.Code, strings.TrimSpace(w.Body.String()), tt.code)
			}
			repos := map[string]bool{}
			var got []string
			if tt.code == 200 {
				// One trigger (Docker Hub, /api/deploy) or a list.
				var one triggered
				var list struct{ Triggered []triggered }
				if err := json.Unmarshal(w.Body.Bytes(), &list); err != nil || list.Triggered == nil {
					if err := json.Unmarshal(w.Body.Bytes(), &one); err != nil {
						t.Fatalf("reply %s: %v", w.Body, err)
					}
					list.Triggered = []triggered{one}
				}
				for _, tr := range list.Triggered {
					repos[tr.Repo] = true
					push := tr.Repo + ":" + tr.Tag
					if _, digests := parseTrigger(storedValue(t, cli, tr.Key)); digests[tr.Tag] != "" {
						push += "@" + digests[tr.Tag]
					}
					got = append(got, push)
				}
			}
			if strings.Join(got, " ") != strings.Join(tt.pushes, " ") {
				t.Errorf("pushes written %q; want %q", got, tt.pushes)
			}
			if n := countKeys(t, cli, h.prefix); n != int64(len(repos)) {
				t.Errorf("%d keys under %s; want %d", n, h.prefix, len(repos))
			}
		})
	}
}

// TestPeerFixturesAllListed keeps the table whole: every file in
// testdata/peer has its expected outcome.
func TestPeerFixturesAllListed(t *testing.T) {
	listed := map[string]bool{}
	for _, f := range peerFixtures {
		listed[f.file] = true
	}
	n := 0
	err := filepath.WalkDir("testdata/peer", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		n++
		rel, _ := filepath.Rel("testdata/peer", path)
		if !listed[filepath.ToSlash(rel)] {
			t.Errorf("testdata/peer/%s has no row in peerFixtures", rel)
		}
		delete(listed, filepath.ToSlash(rel))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for f := range listed {
		t.Errorf("peerFixtures lists %s, which is not in testdata/peer", f)
	}
	if n == 0 {
		t.Fatal("no fixture in testdata/peer")
	}
}

// storedValue reads the value at key, failing when there is none.
func storedValue(t *testing.T, cli *clientv3.Client, key string) []byte {
	t.Helper()
	resp, err := cli.Get(t.Context(), key)
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("get %s: %v (%d keys)", key, err, len(resp.Kvs))
	}
	return resp.Kvs[0].Value
}

// TestEveryTriggerOneRule holds every trigger to the one rule (checkPush,
// README Triggers): a push by tag that names no valid repository is a 400
// and writes nothing; a delivery that is not a push by tag is a 200 that
// writes nothing.
func TestEveryTriggerOneRule(t *testing.T) {
	cli := testEtcd(t)
	const secret = "s3cret"
	gh := func(url, tag string) string {
		return `{"action":"published","package":{"package_type":"container","package_version":{"package_url":"` + url + `","container_metadata":{"tag":{"name":"` + tag + `"}}}}}`
	}
	reg := func(host, repo, tag string) string {
		return `{"events":[{"action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","repository":"` + repo + `","tag":"` + tag + `"},"request":{"host":"` + host + `"}}]}`
	}
	tests := []struct {
		name     string
		endpoint string
		body     string
		code     int
	}{
		{"docker hub, bad repository", "dockerhub", `{"push_data":{"tag":"v1"},"repository":{"repo_name":"../x"}}`, 400},
		{"docker hub, bad tag", "dockerhub", `{"push_data":{"tag":"a b"},"repository":{"repo_name":"a/b"}}`, 400},
		{"registry, no registry host", "registry", reg("registry", "a/b", "v1"), 400},
		{"registry, bad tag", "registry", reg("r:5000", "a/b", "a b"), 400},
		{"registry, not a push", "registry", strings.Replace(reg("registry", "a/b", "v1"), `"push"`, `"pull"`, 1), 200},
		{"harbor, no registry host", "harbor", `{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"tag":"v1","resource_url":"a/b:v1"}]}}`, 400},
		{"harbor, bad tag", "harbor", `{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"tag":"a b","resource_url":"h.io/a/b"}]}}`, 400},
		{"harbor, not a push", "harbor", `{"type":"DELETE_ARTIFACT","event_data":{"resources":[{"tag":"v1","resource_url":"a/b:v1"}]}}`, 200},
		{"quay, no registry host", "quay", `{"docker_url":"a/b","updated_tags":["v1"]}`, 400},
		{"quay, bad tag", "quay", `{"docker_url":"quay.io/a/b","updated_tags":["a b"]}`, 400},
		{"quay, not a push", "quay", `{"docker_url":"a/b","tags":["v1"],"vulnerability":{}}`, 200},
		{"github, no registry host", "github:package", gh("a/b:v1", "v1"), 400},
		{"github, bad tag", "github:package", gh("ghcr.io/a/b:v1", "a b"), 400},
		{"github, not a push", "github:package", strings.Replace(gh("a/b:v1", "v1"), "published", "updated", 1), 200},
		{"api, bad repository", "api", `{"image":"../x:v1"}`, 400},
		{"api, bad tag", "api", `{"image":"a/b:-v"}`, 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, _ := newTestWebhook(t, cli, secret)
			handler, req := peerRequest(h, tt.endpoint, secret, []byte(tt.body))
			req.body = tt.body
			w := serveHook(t, handler, req)
			if w.Code != tt.code {
				t.Fatalf("status %d %s; want %d", w.Code, strings.TrimSpace(w.Body.String()), tt.code)
			}
			if n := countKeys(t, cli, h.prefix); n != 0 {
				t.Errorf("%d keys written; want none", n)
			}
		})
	}
}
