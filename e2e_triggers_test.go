//go:build e2e

package main

// Real-stack scenarios for the trigger endpoints of issue 12 (Harbor,
// /api/deploy, GitHub, Quay) and the scope of the periodic re-pull:
// go test -tags e2e -run '^TestE2ETriggers$' .

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestE2ETriggers(t *testing.T) {
	t.Parallel() // a stack of its own; three run at once (make e2e: -parallel 3)
	s := newStackWith(t, 2, 1)
	all := s.nodes
	harbRef := s.hub.host() + "/myorg/harb:qa"
	apiRef := s.hub.host() + "/myorg/api:qa"
	quayRef := s.hub.host() + "/myorg/quayapp:qa"
	manualRef := s.hub.host() + "/myorg/manual:latest"

	harb := s.build(harbRef, false)
	api := s.build(apiRef, false)
	quay := s.build(quayRef, false)
	manual := s.build(manualRef, false)
	for _, n := range all {
		s.supervise(n, "harb", harbRef, harb)
		s.supervise(n, "api", apiRef, api)
		s.supervise(n, "quay", quayRef, quay)
	}
	s.record("triggers: stack up: %d nodes, 1 etcd member", len(all))

	// deployVia builds a new version of ref, sends the body that send
	// returns to the first node and waits for container name on every
	// node to run it.
	deployVia := func(t *testing.T, label, name, ref string, send func(digest string) (int, string)) string {
		t.Helper()
		id := s.build(ref, false)
		start := time.Now()
		if code, body := send(s.repoDigest(ref)); code != 200 {
			t.Fatalf("%s: %d %s", label, code, body)
		}
		s.waitImage(all, name, id, 90*time.Second)
		s.record("triggers: %s → %s on the new image on all %d nodes: %v", label, name, len(all), time.Since(start).Round(time.Millisecond))
		return id
	}

	t.Run("harbor default format deploys every node", func(t *testing.T) {
		harb = deployVia(t, "harbor PUSH_ARTIFACT (Default)", "harb", harbRef, func(digest string) (int, string) {
			body := strings.NewReplacer(
				"hub.harbor.com/test-webhook/debian:latest", harbRef,
				`"tag": "latest"`, `"tag": "qa"`,
				"sha256:8a9e9863dbb6e10edb5adfe917c00da84e1700fa76e7ed02476aa6e6fb8ee0d8", digest,
			).Replace(string(readFixture(t, "harbor-push-default.json")))
			return s.postHook(all[0], "/api/harbor/webhook", "Bearer "+s.secret, body)
		})
		if v := s.triggerValue(t, strings.TrimSuffix(harbRef, ":qa")); v.Source != "harbor" || v.Tag != "qa" || v.Digest != s.repoDigest(harbRef) {
			t.Errorf("trigger %+v; want source harbor, tag qa, the pushed digest", v)
		}
	})

	t.Run("harbor cloudevents format deploys every node", func(t *testing.T) {
		harb = deployVia(t, "harbor harbor.artifact.pushed (CloudEvents)", "harb", harbRef, func(digest string) (int, string) {
			body := strings.NewReplacer(
				"harbor.dev/library/busybox:1.36", harbRef,
				`"tag":"1.36"`, `"tag":"qa"`,
				"sha256:dde8e930c7b6a490f728e66292bc9bce42efc9bbb5278bae40e4f30f6e00fe8c", digest,
			).Replace(string(readFixture(t, "harbor-push-cloudevents.json")))
			return s.postHook(all[1], "/api/harbor/webhook", "Bearer "+s.secret, body)
		})
	})

	t.Run("api deploy deploys every node", func(t *testing.T) {
		api = deployVia(t, "POST /api/deploy", "api", apiRef, func(string) (int, string) {
			return s.postHook(all[0], "/api/deploy", "Bearer "+s.secret, fmt.Sprintf(`{"image":%q}`, apiRef))
		})
	})

	t.Run("quay with token deploys every node", func(t *testing.T) {
		quay = deployVia(t, "quay Repository Push ?token=", "quay", quayRef, func(string) (int, string) {
			body := strings.NewReplacer(
				`"quay.io/dgangaia/test"`, fmt.Sprintf("%q", strings.TrimSuffix(quayRef, ":qa")),
				`"latest"`, `"qa"`,
			).Replace(string(readFixture(t, "quay-repository-push.json")))
			return s.postHook(all[0], "/api/quay/webhook?token="+s.secret, "", body)
		})
	})

	t.Run("github registry_package signed and unsigned", func(t *testing.T) {
		good := string(readFixture(t, "github-registry-package-published.json"))
		code, body := s.postHeaders(all[0], "/api/github/webhook", map[string]string{
			"X-GitHub-Event": "registry_package", "Content-Type": "application/json",
			"X-Hub-Signature-256": hubSignature(s.secret, good),
		}, good)
		if code != 200 || !strings.Contains(body, `/ghcr.io/codertocat/hello-world"`) {
			t.Fatalf("signed delivery: %d %s; want 200 and the ghcr.io trigger", code, body)
		}
		v := s.triggerValue(t, "ghcr.io/codertocat/hello-world")
		if v.Source != "github" || v.Tag != "v1.2.0" || v.Digest != "sha256:3da1996a8115d7616457760d9920b815241d0a03b34cf5f04e9a0e9d8de37498" {
			t.Errorf("trigger %+v; want source github, tag v1.2.0 and the digest", v)
		}
		s.record("triggers: github registry_package with a good signature → key %s/ghcr.io/codertocat/hello-world (tag %s)", s.prefix, v.Tag)

		forged := strings.ReplaceAll(good, "Codertocat/hello-world", "codertocat/forged")
		code, body = s.postHeaders(all[0], "/api/github/webhook", map[string]string{
			"X-GitHub-Event": "registry_package", "Content-Type": "application/json",
			"X-Hub-Signature-256": hubSignature("not-the-secret", forged),
		}, forged)
		if code != 401 {
			t.Errorf("wrongly signed delivery: %d %s; want 401", code, body)
		}
		resp, err := s.cli.Get(t.Context(), s.prefix+"/ghcr.io/codertocat/forged")
		if err != nil || len(resp.Kvs) != 0 {
			t.Errorf("wrongly signed delivery wrote %v (%v); want nothing", resp.Kvs, err)
		}
		if !t.Failed() {
			s.record("triggers: github delivery with a wrong signature → %d, nothing written", code)
		}
	})

	t.Run("periodic re-pull leaves containers no trigger names alone", func(t *testing.T) {
		for _, n := range all {
			s.dockerCLI(n.dockerd, "run", "-d", "--name", "manual", "--network", "none", manualRef)
		}
		before := map[string]string{}
		for _, n := range all {
			id, img := s.containerImage(n, "manual")
			if img != manual {
				t.Fatalf("manual on %s runs %s; want %s", n.name, shortID(img), shortID(manual))
			}
			before[n.name] = id
		}
		const period = 3 * time.Second
		s.restartDeployers("-repull_period", period.String())
		marks := map[string]int{}
		for _, n := range all {
			marks[n.name] = s.repullRounds(n)
		}

		// Both tags move in the registry; no trigger is sent.
		start := time.Now()
		harb = s.build(harbRef, false)
		newManual := s.build(manualRef, false)
		s.waitImage(all, "harb", harb, 60*time.Second)
		s.record("triggers: re-pull every %v: deployed repository myorg/harb on the new image on all nodes after %v, without a trigger", period, time.Since(start).Round(time.Millisecond))
		// Two more full rounds on every node after that.
		for _, n := range all {
			marks[n.name] = s.repullRounds(n)
		}
		waitFor(t, 30*time.Second, "two more re-pull rounds on every node", func() bool {
			for _, n := range all {
				if s.repullRounds(n) < marks[n.name]+2 {
					return false
				}
			}
			return true
		})
		for _, n := range all {
			id, img := s.containerImage(n, "manual")
			if id != before[n.name] || img != manual {
				t.Errorf("manual container on %s: %s on %s; want %s still on %s", n.name, shortID(id), shortID(img), shortID(before[n.name]), shortID(manual))
			}
			if local, err := n.cli.InspectImage(manualRef); err != nil || local.ID == newManual {
				t.Errorf("%s pulled %s, which no trigger names (%v)", n.name, manualRef, err)
			}
		}
		if !t.Failed() {
			s.record("triggers: re-pull every %v: hand-started container of %s untouched after %v, its tag not pulled", period, "myorg/manual", time.Since(start).Round(time.Millisecond))
		}
	})
}

// hubSignature is GitHub's X-Hub-Signature-256 value for body.
func hubSignature(secret, body string) string {
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(body))
	return "sha256=" + hex.EncodeToString(mac.Sum(nil))
}

// repoDigest returns the manifest digest the builder pushed for ref.
func (s *stack) repoDigest(ref string) string {
	s.t.Helper()
	img, err := s.builder.cli.InspectImage(ref)
	if err != nil {
		s.t.Fatal(err)
	}
	repo := ref[:strings.LastIndexByte(ref, ':')]
	for _, d := range img.RepoDigests {
		if r, dg, ok := strings.Cut(d, "@"); ok && r == repo {
			return dg
		}
	}
	s.t.Fatalf("no digest of %s in %q", repo, img.RepoDigests)
	return ""
}

// triggerValue reads the trigger key of repo.
func (s *stack) triggerValue(t *testing.T, repo string) trigger {
	t.Helper()
	resp, err := s.cli.Get(t.Context(), s.prefix+"/"+repo)
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("trigger key of %s: %v (%d keys)", repo, err, len(resp.Kvs))
	}
	var v trigger
	if err := json.Unmarshal(resp.Kvs[0].Value, &v); err != nil {
		t.Fatalf("trigger of %s: %v", repo, err)
	}
	return v
}

// postHeaders posts body to node n with the given headers.
func (s *stack) postHeaders(n *node, path string, headers map[string]string, body string) (int, string) {
	s.t.Helper()
	req, _ := http.NewRequest("POST", fmt.Sprintf("http://127.0.0.1:%d%s", n.port, path), strings.NewReader(body))
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatalf("POST %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// repullRounds counts the finished re-pull rounds in node n's log.
func (s *stack) repullRounds(n *node) int {
	data, _ := os.ReadFile(filepath.Join(s.dir, "deployer-"+n.name+".log"))
	return strings.Count(string(data), "periodic re-pull queued")
}
