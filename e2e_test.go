//go:build e2e

package main

// The end-to-end suite: go test -tags e2e -run TestE2E (make test runs it).
// See stack_e2e_test.go for the stack.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"context"
	docker "github.com/fsouza/go-dockerclient"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/etcdc"
)

func TestE2E(t *testing.T) {
	t.Parallel() // a stack of its own; two run at once (make e2e: -parallel 2)
	s := newStack(t, 3)
	all := s.nodes
	qaRef := s.hub.host() + "/myorg/app:qa"
	prodRef := s.hub.host() + "/myorg/app:prod"
	svcRef := s.push.host() + "/team/svc:latest"
	slowRef := s.hub.host() + "/myorg/slow:qa"

	qa := s.build(qaRef, false)
	prod := s.build(prodRef, false)
	svc := s.build(svcRef, false)
	slow := s.build(slowRef, true)
	for _, n := range all {
		s.supervise(n, "app", qaRef, qa)
		s.supervise(n, "svc", svcRef, svc)
	}
	s.supervise(s.nodes[1], "prod", prodRef, prod)
	s.supervise(s.nodes[0], "slow", slowRef, slow)
	s.record("stack up: %d nodes, 3 etcd members, 2 registries", len(all))

	// deploy builds a new qa version, sends the Docker Hub webhook to the
	// first node and waits for every node; it returns the new image ID.
	deploy := func(t *testing.T, label string) string {
		qa = s.build(qaRef, false)
		from, hookFrom := len(s.slackTexts()), len(s.hook.got())
		start := time.Now()
		if code, body := s.webhook(all[0], "myorg/app", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.waitImage(all, "app", qa, 90*time.Second)
		s.record("%s: webhook → app on the new image on all %d nodes: %v", label, len(all), time.Since(start).Round(time.Millisecond))
		s.waitReports(from, hookFrom, "Rolled out "+qaRef, "image "+shortID(qa), "3 of 3 nodes")
		return qa
	}

	var brokenQA string     // the version scenario 11 halts
	var rolledBack []string // 14c's versions before its rollback: 15 finds their images removed (-keep_images 2)

	t.Run("1 docker hub webhook deploys every node", func(t *testing.T) {
		old := qa
		deploy(t, "scenario 1")
		for _, n := range all {
			cs, err := n.cli.ListContainers(docker.ListContainersOptions{All: true})
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range cs {
				ci, err := n.cli.InspectContainerWithOptions(docker.InspectContainerOptions{ID: c.ID})
				if err == nil && ci.Image == old {
					t.Errorf("%s still has container %s on the old image", n.name, ci.Name)
				}
			}
		}
	})

	t.Run("2 registry push notification alone deploys", func(t *testing.T) {
		from, hookFrom := len(s.slackTexts()), len(s.hook.got())
		start := time.Now()
		svc = s.build(svcRef, false)
		pushed := time.Since(start)
		s.waitImage(all, "svc", svc, 90*time.Second)
		s.record("scenario 2: docker build+push (%v) → svc on the new image on all nodes: %v", pushed.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
		s.waitReports(from, hookFrom, "Rolled out "+svcRef, "image "+shortID(svc), "3 of 3 nodes")
	})

	t.Run("2b a 3-node deploy sends one report on each service", func(t *testing.T) {
		// count deploys a new qa version and returns the messages each
		// service got, and when the rollout report reached Slack.
		count := func(label string) (slack []string, hook []map[string]string, took time.Duration) {
			from, hookFrom := len(s.slackTexts()), len(s.hook.got())
			start := time.Now()
			deploy(t, label)
			s.waitReportsOnce(from, hookFrom, "Rolled out "+qaRef, "image "+shortID(qa))
			slack, hook = s.slackTexts()[from:], s.hook.got()[hookFrom:]
			s.slack.mu.Lock()
			for i, p := range s.slack.payloads[from:] {
				if text, _ := p["text"].(string); strings.HasPrefix(text, "Rolled out ") {
					took = s.slack.at[from+i].Sub(start)
				}
			}
			s.slack.mu.Unlock()
			return slack, hook, took
		}
		slack, hook, took := count("scenario 2b")
		if len(slack) != 1 || len(hook) != 1 {
			t.Errorf("a 3-node deploy sent %d Slack messages %q and %d webhook messages; want one each", len(slack), slack, len(hook))
		}
		b := hook[0]
		for k, want := range map[string]string{"kind": "rollout", "outcome": outcomeRolledOut, "done": "3", "failed": "0", "nodes": "3", "image_id": qa} {
			if b[k] != want {
				t.Errorf("webhook body %s = %q; want %q", k, b[k], want)
			}
		}
		if !strings.HasPrefix(b["digest"], "sha256:") || !strings.Contains(slack[0], b["digest"]) {
			t.Errorf("report without the pushed digest: %q, %q", b["digest"], slack[0])
		}
		s.record("scenario 2b: a 3-node deploy sent %d Slack message and %d webhook message, the report %v after the webhook: %q",
			len(slack), len(hook), took.Round(time.Millisecond), slack[0])

		// The original's messages, one per node, with -notify_per_node;
		// and with a Slack bot token, one thread per rollout.
		api := newSlackAPIRecorder(t)
		threadFlags := []string{"-notify_per_node", "-slack_token", "xoxb-test-token", "-slack_channel", "C123", "-slack_api", api.URL + "/"}
		s.restartDeployers(threadFlags...)
		slack, hook, _ = count("scenario 2b (-notify_per_node)")
		perNode := 0
		for _, text := range slack {
			if strings.HasPrefix(text, "Deploying "+s.hub.host()+"/myorg/app on ") {
				perNode++
			}
		}
		if perNode != len(all) || len(slack) != len(all)+1 || len(hook) != len(all)+1 {
			t.Errorf("with -notify_per_node: %d Slack messages (%d per node), %d webhook messages; want %d per node and the report on each", len(slack), perNode, len(hook), len(all))
		}
		s.record("scenario 2b: with -notify_per_node the same deploy sent %d Slack messages (%d from the nodes, as before this change, and the report) and %d webhook messages", len(slack), perNode, len(hook))
		var parents, replies int
		var parent string
		for _, c := range api.got() {
			switch {
			case c.method == "postMessage" && c.form["thread_ts"] == "":
				parents++
			case c.method == "postMessage":
				replies++
			case c.method == "update":
				parent = c.form["text"]
			}
		}
		if parents != 1 || replies != len(all)+1 || !strings.HasPrefix(parent, "Rolled out "+qaRef) {
			t.Errorf("Slack thread: %d parent messages, %d replies, the parent's last text %q; want 1, %d (the nodes and the report), the report", parents, replies, parent, len(all)+1)
		}
		s.record("scenario 2b: with -slack_token the rollout was one thread: %d parent message, %d replies (the %d nodes and the report), %d Web API calls in all", parents, replies, len(all), len(api.got()))
		for _, n := range all {
			n.args = slices.DeleteFunc(n.args, func(a string) bool { return slices.Contains(threadFlags, a) })
		}
		s.restartDeployers()
	})

	t.Run("2c the node that would send the report is killed: another sends it, once", func(t *testing.T) {
		if err := os.WriteFile(s.holdReports(), nil, 0o644); err != nil {
			t.Fatal(err)
		}
		defer os.Remove(s.holdReports())
		from, hookFrom := len(s.slackTexts()), len(s.hook.got())
		qa = s.build(qaRef, false)
		if code, body := s.webhook(all[0], "myorg/app", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.waitImage(all, "app", qa, 90*time.Second)
		var claimant string
		waitFor(t, 30*time.Second, "a node to claim the report", func() bool {
			resp, err := s.cli.Get(t.Context(), s.prefix+reportsPrefix, clientv3.WithPrefix())
			if err == nil && len(resp.Kvs) == 1 {
				claimant = string(resp.Kvs[0].Value)
			}
			return claimant != ""
		})
		killed := nodeByName(all, claimant)
		start := time.Now()
		killed.deployer.stop(syscall.SIGKILL, 5*time.Second)
		os.Remove(s.holdReports())
		text := s.waitReportsOnce(from, hookFrom, "Rolled out "+qaRef, "image "+shortID(qa), "3 of 3 nodes")
		took := time.Since(start)
		h, err := readHistory(t.Context(), etcdc.InPrefix(s.cli, s.prefix), historyFilter{}, time.Now())
		if err != nil {
			t.Fatal(err)
		}
		var sender string
		for _, tag := range h.Tags {
			for _, v := range tag.Versions {
				if v.ImageID == qa && v.Reported != nil {
					sender = v.Reported.Node
				}
			}
		}
		if sender == "" || sender == claimant {
			t.Errorf("the report was marked sent by %q; want a node other than %s, which was killed", sender, claimant)
		}
		s.runDeployer(killed) // its restart sends nothing again
		s.barrier(all)
		if sl, hk := s.rolloutReports(from, hookFrom, "image "+shortID(qa)); len(sl) != 1 || len(hk) != 1 {
			t.Errorf("after %s restarted: %d reports on Slack, %d on the webhook; want one each", claimant, len(sl), len(hk))
		}
		s.record("scenario 2c: %s SIGKILLed holding the report's claim; %s sent it %v later (the lease's expiry and the takeover), once on each service; the restart sent nothing: %q",
			claimant, sender, took.Round(time.Millisecond), text)
	})

	t.Run("3 pushing one tag restarts only that tag", func(t *testing.T) {
		prodID, _ := s.containerImage(all[1], "prod")
		deploy(t, "scenario 3 (qa)")
		s.barrier(all)
		if id, img := s.containerImage(all[1], "prod"); id != prodID || img != prod {
			t.Errorf("prod container changed (%s → %s, image %s) when only :qa was pushed", shortID(prodID), shortID(id), shortID(img))
		}
		// And the other way round.
		appIDs := map[string]string{}
		for _, n := range all {
			appIDs[n.name], _ = s.containerImage(n, "app")
		}
		prod = s.build(prodRef, false)
		if code, body := s.webhook(all[2], "myorg/app", "prod"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.waitImage([]*node{all[1]}, "prod", prod, 60*time.Second)
		s.barrier(all)
		for _, n := range all {
			if id, _ := s.containerImage(n, "app"); id != appIDs[n.name] {
				t.Errorf("%s: app (:qa) restarted when only :prod was pushed", n.name)
			}
		}
	})

	t.Run("4 a killed node catches up after restart without redeploying the rest", func(t *testing.T) {
		n2 := all[1]
		prodID, _ := s.containerImage(n2, "prod")
		svcID, _ := s.containerImage(n2, "svc")
		n2.deployer.stop(syscall.SIGKILL, time.Second)
		old := qa
		qa = s.build(qaRef, false)
		if code, body := s.webhook(all[0], "myorg/app", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.waitImage([]*node{all[0], all[2]}, "app", qa, 60*time.Second)
		if _, img := s.containerImage(n2, "app"); img != old {
			t.Fatalf("node2 changed image while its deployer was dead")
		}
		start := time.Now()
		s.runDeployer(n2)
		s.waitImage([]*node{n2}, "app", qa, 60*time.Second)
		s.record("scenario 4: node2 deployer restarted → app on the new image: %v", time.Since(start).Round(time.Millisecond))
		s.barrier(all)
		if pulls := s.metric(n2, "deployer_pulls_total", ""); pulls != 1 {
			t.Errorf("node2 pulled %v times after restart; want 1 (only the changed tag)", pulls)
		}
		if id, _ := s.containerImage(n2, "prod"); id != prodID {
			t.Error("node2 restarted prod, which had not changed")
		}
		if id, _ := s.containerImage(n2, "svc"); id != svcID {
			t.Error("node2 restarted svc, which had not changed")
		}
	})

	t.Run("5 etcd member loss and total outage", func(t *testing.T) {
		s.etcd[2].proc.stop(syscall.SIGTERM, 10*time.Second)
		deploy(t, "scenario 5a (one etcd member down)")

		s.etcd[0].proc.stop(syscall.SIGTERM, 10*time.Second)
		s.etcd[1].proc.stop(syscall.SIGTERM, 10*time.Second)
		start := time.Now()
		code, body := s.webhook(all[0], "myorg/app", "qa")
		if code != http.StatusServiceUnavailable {
			t.Errorf("webhook with etcd down: %d %s; want 503", code, body)
		}
		s.record("scenario 5b: all etcd members down → webhook answered %d in %v", code, time.Since(start).Round(time.Millisecond))

		for _, m := range s.etcd {
			s.startEtcdMember(m)
		}
		s.waitEtcdHealthy()
		old := qa
		qa = s.build(qaRef, false)
		start = time.Now()
		waitFor(t, 60*time.Second, "webhook accepted after etcd is back", func() bool {
			code, _ := s.webhook(all[0], "myorg/app", "qa")
			return code == 200
		})
		s.waitImage(all, "app", qa, 90*time.Second)
		s.record("scenario 5c: etcd back → next push on all nodes in %v (old %s)", time.Since(start).Round(time.Millisecond), shortID(old))
	})

	t.Run("6 registry down during a deploy is reported, then converges", func(t *testing.T) {
		old := qa
		qa = s.build(qaRef, false)
		s.hub.proc.stop(syscall.SIGTERM, 10*time.Second)
		from := len(s.slackTexts())
		if code, body := s.webhook(all[0], "myorg/app", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.waitSlack(from, all, "FAILED", "myorg/app:qa pull failed")
		for _, n := range all {
			if _, img := s.containerImage(n, "app"); img != old {
				t.Errorf("%s: app not on the old image while the registry is down (%s)", n.name, shortID(img))
			}
		}
		s.startRegistryProc(s.hub, "hub")
		start := time.Now()
		if code, body := s.webhook(all[0], "myorg/app", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.waitImage(all, "app", qa, 90*time.Second)
		s.record("scenario 6: registry back → converged in %v", time.Since(start).Round(time.Millisecond))
	})

	t.Run("7 bad input changes nothing", func(t *testing.T) {
		rev := s.revision()
		ids := map[string]string{}
		for _, n := range all {
			ids[n.name], _ = s.containerImage(n, "app")
		}
		auth := "Bearer " + s.secret
		tests := []struct {
			name, method, path, auth, body string
			code                           int
		}{
			{"GET", "GET", "/api/dockerhub/webhook", auth, "", 405},
			{"no secret", "POST", "/api/dockerhub/webhook", "", hubBody("myorg/app", "qa"), 401},
			{"wrong secret", "POST", "/api/dockerhub/webhook", "Bearer wrong", hubBody("myorg/app", "qa"), 401},
			{"invalid JSON", "POST", "/api/dockerhub/webhook", auth, "{not json", 400},
			{"2 MiB", "POST", "/api/dockerhub/webhook", auth, `{"repository":{"repo_name":"myorg/app"},"x":"` + strings.Repeat("x", 2<<20) + `"}`, 413},
			{"dot dot", "POST", "/api/dockerhub/webhook", auth, hubBody("../../x", ""), 400},
			{"star", "POST", "/api/dockerhub/webhook", auth, hubBody("*", ""), 400},
			{"upper case", "POST", "/api/dockerhub/webhook", auth, hubBody("MyOrg/App", "qa"), 400},
			{"empty", "POST", "/api/dockerhub/webhook", auth, hubBody("", "qa"), 400},
			{"registry GET", "GET", "/api/registry/webhook", auth, "", 405},
			{"registry blobs only", "POST", "/api/registry/webhook", auth, string(readFixture(t, "registry-notification-blob-push.json")), 200},
			{"registry no secret", "POST", "/api/registry/webhook", "", string(readFixture(t, "registry-notification-manifest-push.json")), 401},
		}
		for _, tt := range tests {
			req, _ := http.NewRequest(tt.method, fmt.Sprintf("http://127.0.0.1:%d%s", all[0].port, tt.path), strings.NewReader(tt.body))
			if tt.auth != "" {
				req.Header.Set("Authorization", tt.auth)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatalf("%s: %v", tt.name, err)
			}
			resp.Body.Close()
			if resp.StatusCode != tt.code {
				t.Errorf("%s: status %d; want %d", tt.name, resp.StatusCode, tt.code)
			}
		}
		resp, err := s.cli.Get(context.Background(), s.prefix+"/", clientv3.WithPrefix(), clientv3.WithMinModRev(rev+1))
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range resp.Kvs {
			if _, ok := repoFromKey(strings.TrimPrefix(string(kv.Key), s.prefix)); ok {
				t.Errorf("bad input wrote trigger %s", kv.Key)
			}
		}
		s.barrier(all)
		for _, n := range all {
			if id, _ := s.containerImage(n, "app"); id != ids[n.name] {
				t.Errorf("%s: app restarted after bad input", n.name)
			}
		}
		s.record("scenario 7: %d bad requests answered as documented, no trigger written, no restart", len(tests))
	})

	t.Run("8 a burst of 50 webhooks costs at most 2 pulls per node", func(t *testing.T) {
		before := map[string]float64{}
		for _, n := range all {
			before[n.name] = s.metric(n, "deployer_pulls_total", "")
		}
		qa = s.build(qaRef, false)
		start := time.Now()
		var wg sync.WaitGroup
		codes := make(chan int, 50)
		for i := range 50 {
			wg.Go(func() {
				time.Sleep(time.Duration(i) * 20 * time.Millisecond) // spread over one second
				code, _ := s.webhook(all[i%len(all)], "myorg/app", "qa")
				codes <- code
			})
		}
		wg.Wait()
		close(codes)
		for c := range codes {
			if c != 200 {
				t.Errorf("burst webhook answered %d", c)
			}
		}
		s.waitImage(all, "app", qa, 90*time.Second)
		converged := time.Since(start)
		s.barrier(all)
		var counts []string
		for _, n := range all {
			pulls := s.metric(n, "deployer_pulls_total", "") - before[n.name]
			counts = append(counts, fmt.Sprintf("%s=%v", n.name, pulls))
			if pulls > 2 {
				t.Errorf("%s pulled %v times for a burst of 50; want at most 2", n.name, pulls)
			}
		}
		s.record("scenario 8: 50 webhooks in 1s → converged in %v; pulls per node: %s", converged.Round(time.Millisecond), strings.Join(counts, " "))
	})

	t.Run("9 SIGTERM during a deploy exits 0 in time and leaves nothing stopped", func(t *testing.T) {
		n1 := all[0]
		slow = s.build(slowRef, true)
		if code, body := s.webhook(n1, "myorg/slow", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		// The pull is done when the local tag moves; the stop (which
		// takes the whole -kill_timeout for this image) follows at once.
		waitFor(t, 60*time.Second, "node1 to pull the slow image", func() bool {
			img, err := n1.cli.InspectImage(slowRef)
			return err == nil && img.ID == slow
		})
		start := time.Now()
		n1.deployer.stop(syscall.SIGTERM, 30*time.Second)
		took := time.Since(start)
		if n1.deployer.err != nil {
			t.Errorf("deployer exit after SIGTERM: %v; want status 0\n%s", n1.deployer.err, n1.deployer.tail(10))
		}
		if took > 8*time.Second {
			t.Errorf("deployer took %v to exit; want within -kill_timeout (3s) + 5s", took)
		}
		s.waitImage([]*node{n1}, "slow", slow, 60*time.Second)
		s.record("scenario 9: SIGTERM during a 3s stop → exit status 0 after %v; slow container back on the new image", took.Round(time.Millisecond))
		s.runDeployer(n1)
	})

	t.Run("10 rolling deploy keeps at most max_unavailable nodes down", func(t *testing.T) {
		stop := s.sampler("app")
		start := time.Now()
		deploy(t, "scenario 10 (rolling, max_unavailable=1)")
		took := time.Since(start)
		maxDown, samples := stop()
		if maxDown > 1 {
			t.Errorf("up to %d nodes had no running app at once during a rolling deploy; want at most 1", maxDown)
		}
		s.record("scenario 10: rolling deploy over 3 nodes: %v; most nodes down at once: %d (%d samples every 50ms)", took.Round(time.Millisecond), maxDown, samples)

		s.restartDeployers("-max_unavailable=0")
		stop = s.sampler("app")
		start = time.Now()
		deploy(t, "scenario 10 (all at once, max_unavailable=0)")
		took = time.Since(start)
		maxDown, samples = stop()
		s.record("scenario 10: all-at-once deploy over 3 nodes: %v; most nodes down at once: %d (%d samples)", took.Round(time.Millisecond), maxDown, samples)
		s.restartDeployers("-max_unavailable=1")
	})

	t.Run("11 a version that exits at once halts after the first node", func(t *testing.T) {
		good := qa
		ids := map[string]string{}
		for _, n := range all {
			ids[n.name], _ = s.containerImage(n, "app")
		}
		broken := s.buildKind(qaRef, "broken")
		brokenQA = broken // 14b finds it halted in the ledger
		from, hookFrom := len(s.slackTexts()), len(s.hook.got())
		start := time.Now()
		if code, body := s.webhook(all[0], "myorg/app", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		var halted *halt
		waitFor(t, 60*time.Second, "the rollout to halt", func() bool {
			for _, tag := range s.status(all[0]).Tags {
				if tag.Image == qaRef && tag.Halted != nil && tag.Halted.ImageID == broken {
					halted = tag.Halted
					return true
				}
			}
			return false
		})
		tookHalt := time.Since(start)
		s.barrier(all)
		failing, kept := 0, 0
		for _, n := range all {
			id, img := s.containerImage(n, "app")
			switch {
			case n.name == halted.Node:
				failing++
			case id == ids[n.name] && img == good:
				kept++
			default:
				t.Errorf("%s: app %s on %s; want the old container on %s", n.name, shortID(id), shortID(img), shortID(good))
			}
		}
		if failing != 1 || kept != 2 {
			t.Errorf("halted on %s: %d failing node, %d nodes kept the old version; want 1 and 2", halted.Node, failing, kept)
		}
		s.waitSlack(from, []*node{nodeByName(all, halted.Node)}, "FAILED", "exited")
		report := s.waitReportsOnce(from, hookFrom, ":x: Rollout HALTED: "+qaRef, "image "+shortID(broken), "1 failed", halted.Node+" failed: ")
		failures := 0
		for _, text := range s.slackTexts()[from:] {
			if strings.Contains(text, "FAILED deploying") {
				failures++
			}
		}
		if failures != 1 {
			t.Errorf("%d failure messages on Slack; want one, at once, from %s", failures, halted.Node)
		}
		s.record("scenario 11: one failure at once from %s and one final report: %q", halted.Node, report)
		s.record("scenario 11: broken version halted by %s %v after the webhook (%s); 2 other nodes kept %s", halted.Node, tookHalt.Round(time.Millisecond), halted.Reason, shortID(good))

		// A new push resumes normal rollouts.
		start = time.Now()
		qa = s.build(qaRef, false)
		if code, body := s.webhook(all[0], "myorg/app", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.waitImage(all, "app", qa, 90*time.Second)
		s.record("scenario 11: next good push rolled out to all nodes in %v", time.Since(start).Round(time.Millisecond))
	})

	t.Run("12 recreate keeps name, env, labels, mounts and restart policy", func(t *testing.T) {
		n3 := all[2]
		recRef := s.hub.host() + "/myorg/rec:v1"
		rec := s.build(recRef, false)
		data := filepath.Join(s.dir, "rec-data")
		if err := os.MkdirAll(data, 0o755); err != nil {
			t.Fatal(err)
		}
		s.dockerCLI(n3.dockerd, "pull", "-q", recRef)
		s.dockerCLI(n3.dockerd, "run", "-d", "--name", "rec", "--network", "none", "--restart", "unless-stopped",
			"-e", "FOO=bar", "-l", "team=x", "-l", "deployer.strategy=recreate", "-v", data+":/data", recRef)
		oldID, _ := s.containerImage(n3, "rec")
		old := rec
		rec = s.build(recRef, false)
		start := time.Now()
		if code, body := s.webhook(all[0], "myorg/rec", "v1"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.waitImage([]*node{n3}, "rec", rec, 60*time.Second)
		took := time.Since(start)
		c, err := n3.cli.InspectContainerWithOptions(docker.InspectContainerOptions{ID: "rec"})
		if err != nil {
			t.Fatal(err)
		}
		if c.ID == oldID || !slices.Contains(c.Config.Env, "FOO=bar") || c.Config.Labels["team"] != "x" ||
			c.HostConfig.RestartPolicy.Name != "unless-stopped" || c.HostConfig.NetworkMode != "none" ||
			!slices.Contains(c.HostConfig.Binds, data+":/data") {
			t.Errorf("recreated container: env %v labels %v restart %q network %q binds %v",
				c.Config.Env, c.Config.Labels, c.HostConfig.RestartPolicy.Name, c.HostConfig.NetworkMode, c.HostConfig.Binds)
		}
		// The old one goes once the new one is confirmed up.
		waitFor(t, 30*time.Second, "the old container to be removed", func() bool {
			_, err := n3.cli.InspectContainerWithOptions(docker.InspectContainerOptions{ID: oldID})
			return err != nil
		})
		s.record("scenario 12: recreate (no supervisor) %s → %s in %v, name/env/labels/mounts/restart policy kept", shortID(old), shortID(rec), took.Round(time.Millisecond))
	})

	t.Run("13 a node killed while holding a slot blocks the rollout at most its lease", func(t *testing.T) {
		holdRef := s.hub.host() + "/myorg/hold:qa"
		hold := s.build(holdRef, true) // stops take the whole -kill_timeout (3s)
		for _, n := range all {
			s.supervise(n, "hold", holdRef, hold)
		}
		hold = s.build(holdRef, true)
		if code, body := s.webhook(all[0], "myorg/hold", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		var holder *node
		waitFor(t, 30*time.Second, "a node to take the slot", func() bool {
			for _, tag := range s.status(all[0]).Tags {
				if tag.Image == holdRef && len(tag.Rolling) > 0 {
					holder = nodeByName(all, strings.Fields(tag.Rolling[0])[0])
					return holder != nil
				}
			}
			return false
		})
		holder.deployer.stop(syscall.SIGKILL, time.Second)
		killed := time.Now()
		var rest []*node
		for _, n := range all {
			if n != holder {
				rest = append(rest, n)
			}
		}
		s.waitImage(rest, "hold", hold, 90*time.Second)
		took := time.Since(killed)
		// Two nodes one after the other, each a 3s stop plus the
		// supervisor's restart, after at most one lease (10s).
		if limit := sessionTTL*time.Second + 2*8*time.Second; took > limit {
			t.Errorf("the other nodes took %v after the holder died; want under %v", took, limit)
		}
		s.record("scenario 13: slot holder %s SIGKILLed; the other 2 nodes finished %v later (lease TTL %ds)", holder.name, took.Round(time.Millisecond), sessionTTL)
		s.runDeployer(holder)
		s.waitImage([]*node{holder}, "hold", hold, 60*time.Second)
	})

	t.Run("14 cluster status", func(t *testing.T) {
		var st clusterStatus
		waitFor(t, 30*time.Second, "status of every node", func() bool {
			st = s.status(all[1])
			for _, tag := range st.Tags {
				if tag.Image == qaRef {
					return len(st.Nodes) == len(all) && len(tag.Versions) == 1 && len(tag.Versions[0].Nodes) == len(all) && tag.Versions[0].ImageID == qa
				}
			}
			return false
		})
		out, err := exec.Command(s.bin, "status", "-etcd_nodes", s.etcdEndpoints(), "-etcd_prefix", s.prefix).CombinedOutput()
		if err != nil {
			t.Fatalf("deployer status: %v\n%s", err, out)
		}
		for _, want := range []string{qaRef, shortID(qa), "node1,node2,node3", "NODE"} {
			if !strings.Contains(string(out), want) {
				t.Errorf("deployer status lacks %q:\n%s", want, out)
			}
		}
		s.record("scenario 14: deployer status:\n%s", out)
	})

	t.Run("14b deploy history", func(t *testing.T) {
		args := []string{"history", "-etcd_nodes", s.etcdEndpoints(), "-etcd_prefix", s.prefix, qaRef}
		var h historyView
		var out []byte
		rolledOut := func() bool {
			var err error
			if out, err = exec.Command(s.bin, append(args, "-json")...).Output(); err != nil || json.Unmarshal(out, &h) != nil {
				return false
			}
			if len(h.Tags) != 1 || len(h.Tags[0].Versions) == 0 {
				return false
			}
			v := h.Tags[0].Versions[0]
			return v.ImageID == qa && v.converged() == len(all) && v.Outcome == outcomeRolledOut
		}
		for deadline := time.Now().Add(30 * time.Second); !rolledOut(); {
			if time.Now().After(deadline) {
				t.Fatalf("the ledger's newest qa version is not %s rolled out on every node within 30s:\n%s", shortID(qa), out)
			}
			time.Sleep(200 * time.Millisecond) // polling the real stack
		}
		vs := h.Tags[0].Versions
		if len(vs) < 3 {
			t.Errorf("%d versions of %s in the ledger, want one per deploy (at least 3):\n%s", len(vs), qaRef, out)
		}
		for _, v := range vs {
			if v.Outcome == outcomeRolledOut && (v.LastSeconds <= 0 || v.FirstSeconds > v.LastSeconds || v.Completed.IsZero()) {
				t.Errorf("version %d rolled out with lead times %.2fs … %.2fs", v.Version, v.FirstSeconds, v.LastSeconds)
			}
		}
		for _, v := range vs {
			if brokenQA != "" && v.ImageID == brokenQA && (v.Outcome != outcomeHalted || !strings.Contains(v.nodesSummary(), "failed: ")) {
				t.Errorf("scenario 11's version in the ledger: %s, nodes %s; want halted with its failed node", v.Outcome, v.nodesSummary())
			}
		}
		if v := vs[0]; v.AskedBy.Source != "dockerhub" || v.AskedBy.Remote == "" {
			t.Errorf("newest version asked by %+v, want the Docker Hub webhook and its address", v.AskedBy)
		}
		table, err := exec.Command(s.bin, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("deployer history: %v\n%s", err, table)
		}
		if !strings.Contains(string(table), shortID(qa)) || !strings.Contains(string(table), "3 (node1,node2,node3)") {
			t.Errorf("deployer history lacks the newest version on 3 nodes:\n%s", table)
		}
		s.record("scenario 14b: deployer history %s (newest: first node %.2fs, last node %.2fs after the trigger):\n%s", qaRef, vs[0].FirstSeconds, vs[0].LastSeconds, table)
	})

	t.Run("14c deployer rollback puts the previous version back on every node", func(t *testing.T) {
		v1 := deploy(t, "scenario 14c (first good version)")
		v2 := deploy(t, "scenario 14c (second good version)")
		// The default target is the newest earlier version that rolled
		// out: wait until the ledger has v1 rolled out and v2 newest.
		hist := []string{"history", "-json", "-etcd_nodes", s.etcdEndpoints(), "-etcd_prefix", s.prefix, qaRef}
		var out []byte
		waitFor(t, 30*time.Second, "the ledger: v2 newest, v1 rolled out", func() bool {
			var h historyView
			var err error
			if out, err = exec.Command(s.bin, hist...).Output(); err != nil || json.Unmarshal(out, &h) != nil || len(h.Tags) != 1 || len(h.Tags[0].Versions) < 2 {
				return false
			}
			vs := h.Tags[0].Versions
			return vs[0].ImageID == v2 && vs[0].Outcome == outcomeRolledOut && vs[1].ImageID == v1 && vs[1].Outcome == outcomeRolledOut && vs[1].Digest != ""
		})

		stop := s.sampler("app")
		start := time.Now()
		cmd, err := exec.Command(s.bin, "rollback", qaRef, "-etcd_nodes", s.etcdEndpoints(), "-etcd_prefix", s.prefix, "-dockercfg", "").CombinedOutput()
		answered := time.Since(start)
		if err != nil {
			t.Fatalf("deployer rollback: %v\n%s", err, cmd)
		}
		t.Logf("deployer rollback %s: %s", qaRef, cmd)
		s.waitImage(all, "app", v1, 90*time.Second)
		took := time.Since(start)
		maxDown, samples := stop()
		if maxDown > 1 {
			t.Errorf("up to %d nodes had no running app at once during the rollback; want at most 1 (-max_unavailable)", maxDown)
		}
		s.record("scenario 14c: deployer rollback answered in %v; every node back on %s %v after the command; most nodes down at once: %d (%d samples every 50ms)\n%s",
			answered.Round(time.Millisecond), shortID(v1), took.Round(time.Millisecond), maxDown, samples, cmd)
		qa = v1

		var h historyView
		waitFor(t, 30*time.Second, "the rollback's version rolled out in the ledger", func() bool {
			if out, err = exec.Command(s.bin, hist...).Output(); err != nil || json.Unmarshal(out, &h) != nil || len(h.Tags) != 1 || len(h.Tags[0].Versions) < 2 {
				return false
			}
			vs := h.Tags[0].Versions
			return vs[0].ImageID == v1 && vs[0].Outcome == outcomeRolledOut && vs[1].ImageID == v2 && vs[1].Outcome == outcomeRolledBack
		})
		if a := h.Tags[0].Versions[0].AskedBy; a.Source != "rollback" || !strings.HasPrefix(a.Command, "deployer rollback ") || a.Host == "" {
			t.Errorf("the rollback's version asked by %+v; want the command and its host", a)
		}

		// The tag now means v1: a supervisor restart (docker pull, then
		// docker run) still runs it.
		s.barrier(all)
		before, _ := s.containerImage(all[2], "app")
		s.dockerCLI(all[2].dockerd, "kill", "app")
		waitFor(t, 60*time.Second, "the supervisor on node3 to run app again", func() bool {
			id, img := s.containerImage(all[2], "app")
			return id != "" && id != before && img != ""
		})
		if _, img := s.containerImage(all[2], "app"); img != v1 {
			t.Errorf("after a supervisor restart node3 runs %s; want the rolled-back-to %s", shortID(img), shortID(v1))
		}

		// A restart of every deployer, then two rounds of the periodic
		// re-pull on each: nothing moves.
		ids := map[string]string{}
		for _, n := range all {
			ids[n.name], _ = s.containerImage(n, "app")
		}
		s.restartDeployers("-repull_period", "2s")
		marks := map[string]int{}
		for _, n := range all {
			marks[n.name] = s.repullRounds(n)
		}
		waitFor(t, 30*time.Second, "two re-pull rounds on every node", func() bool {
			for _, n := range all {
				if s.repullRounds(n) < marks[n.name]+2 {
					return false
				}
			}
			return true
		})
		s.barrier(all)
		for _, n := range all {
			if id, img := s.containerImage(n, "app"); id != ids[n.name] || img != v1 {
				t.Errorf("after a deployer restart and the re-pull, %s runs app %s on %s; want %s on %s", n.name, shortID(id), shortID(img), shortID(ids[n.name]), shortID(v1))
			}
		}
		s.restartDeployers("-repull_period", "0")

		// A new push deploys normally and ends the rollback.
		v3 := deploy(t, "scenario 14c (a push after the rollback)")
		waitFor(t, 30*time.Second, "the push after the rollback rolled out in the ledger", func() bool {
			if out, err = exec.Command(s.bin, hist...).Output(); err != nil || json.Unmarshal(out, &h) != nil || len(h.Tags) != 1 || len(h.Tags[0].Versions) < 3 {
				return false
			}
			vs := h.Tags[0].Versions
			return vs[0].ImageID == v3 && vs[0].Outcome == outcomeRolledOut && vs[1].ImageID == v1 && vs[1].AskedBy.Source == "rollback" &&
				vs[2].ImageID == v2 && vs[2].Outcome == outcomeRolledBack
		})
		table, err := exec.Command(s.bin, append([]string{"history"}, hist[2:]...)...).CombinedOutput()
		if err != nil || !strings.Contains(string(table), outcomeRolledBack) {
			t.Errorf("deployer history: %v; want the rolled-back version:\n%s", err, table)
		}
		rolledBack = []string{v1, v2}
		s.record("scenario 14c: the fleet stayed on %s through a supervisor restart, a restart of every deployer and two re-pull rounds; the next push rolled out:\n%s", shortID(v1), table)
	})

	t.Run("14d a halted version comes back by webhook, restart and re-pull: no container starts on it", func(t *testing.T) {
		quarantineScenario(t, s)
	})

	t.Run("14e a rollback the registry refuses pins the fleet to the old version instead", func(t *testing.T) {
		refusedRollbackScenario(t, s)
	})

	t.Run("14d the dashboard in a browser: login, a deploy watched live, a rollback", func(t *testing.T) {
		dashboardScenario(t, s, qaRef, &qa, deploy)
	})

	t.Run("15 dry run reports and stops nothing; cleanup removes the old image", func(t *testing.T) {
		s.restartDeployers("-dry_run=true")
		ids := map[string]string{}
		for _, n := range all {
			ids[n.name], _ = s.containerImage(n, "app")
		}
		old := qa
		qa = s.build(qaRef, false)
		from := len(s.slackTexts())
		if code, body := s.webhook(all[0], "myorg/app", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.waitSlack(from, all, "Dry run", "would restart: app ("+shortID(old)+" → "+shortID(qa)+")")
		s.barrier(all)
		for _, n := range all {
			if id, img := s.containerImage(n, "app"); id != ids[n.name] || img != old {
				t.Errorf("%s: dry run restarted app", n.name)
			}
			if got := s.metric(n, "deployer_dry_run_would_restart_total", ""); got != 1 {
				t.Errorf("%s: deployer_dry_run_would_restart_total = %v; want 1", n.name, got)
			}
		}

		s.restartDeployers("-dry_run=false", "-cleanup")
		if code, body := s.webhook(all[0], "myorg/app", "qa"); code != 200 {
			t.Fatalf("webhook: %d %s", code, body)
		}
		s.waitImage(all, "app", qa, 90*time.Second)
		s.barrier(all)
		// -keep_images 2 (the default): the image replaced stays, for a
		// rollback; those of older versions go.
		for _, n := range all {
			if _, err := n.cli.InspectImage(old); err != nil {
				t.Errorf("%s: the image replaced, %s, was removed; -keep_images 2 keeps it", n.name, shortID(old))
			}
			for _, id := range rolledBack {
				if _, err := n.cli.InspectImage(id); err == nil {
					t.Errorf("%s: image %s of an older version still there with -cleanup -keep_images 2", n.name, shortID(id))
				}
			}
		}
		s.restartDeployers("-keep_images=1")
		old = qa
		deploy(t, "scenario 15 (-cleanup -keep_images=1)")
		s.barrier(all)
		for _, n := range all {
			if _, err := n.cli.InspectImage(old); err == nil {
				t.Errorf("%s: superseded image %s still there with -cleanup -keep_images=1", n.name, shortID(old))
			}
		}
		s.record("scenario 15: -dry_run reported 'would restart' on 3 nodes and stopped nothing; -cleanup kept the image replaced and removed older versions' (%d of 14c's) everywhere; with -keep_images=1 it removed %s", len(rolledBack), shortID(old))
	})

	t.Run("16 the deployer in a container never stops itself", func(t *testing.T) {
		// The Dockerfile's final stage: the static binary alone in a
		// scratch image, the Docker socket mounted; its embedded etcd;
		// the periodic re-pull as the trigger (the container has no
		// network, so no webhook reaches it).
		n := all[2]
		ctxDir := filepath.Join(s.dir, "self-image")
		if err := os.MkdirAll(ctxDir, 0o755); err != nil {
			t.Fatal(err)
		}
		build := exec.Command("go", "build", "-o", filepath.Join(ctxDir, "deployer"), ".")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("static build: %v\n%s", err, out)
		}
		selfRef := s.hub.host() + "/myorg/deployer:latest"
		pushSelf := func(version string) string {
			os.WriteFile(filepath.Join(ctxDir, "version"), []byte(version), 0o644)
			os.WriteFile(filepath.Join(ctxDir, "Dockerfile"), []byte("FROM scratch\nCOPY deployer /deployer\nCOPY version /version\nENTRYPOINT [\"/deployer\"]\n"), 0o644)
			s.dockerCLI(s.builder, "build", "-q", "-t", selfRef, ctxDir)
			s.dockerCLI(s.builder, "push", "-q", selfRef)
			img, err := s.builder.cli.InspectImage(selfRef)
			if err != nil {
				t.Fatal(err)
			}
			return img.ID
		}
		v1 := pushSelf("v1")
		s.dockerCLI(n.dockerd, "pull", "-q", selfRef)
		s.dockerCLI(n.dockerd, "run", "-d", "--name", "self", "--network", "none", "-v", n.sock+":/var/run/docker.sock", "-l", managedLabel+"=true",
			selfRef, "-etcd_nodes=", "-etcd_data_dir", "/tmp/etcd", "-repull_period", "2s", "-dockercfg=",
			"-node_name", "self", "-max_unavailable=0", "-listen", "127.0.0.1:4500", "-registry", s.hub.host())
		selfID, _ := s.containerImage(n, "self")
		if selfID == "" {
			t.Fatalf("deployer container not running:\n%s", s.dockerCLI(n.dockerd, "logs", "self"))
		}
		// A stale app next to it proves the containerised deployer works.
		// Its etcd holds no trigger, so the re-pull covers only what is
		// labelled deployer.managed=true.
		s.supervise(n, "managed", qaRef, qa, "-l", managedLabel+"=true")
		old := qa
		qa = s.build(qaRef, false)
		v2 := pushSelf("v2")
		s.waitImage([]*node{n}, "managed", qa, 60*time.Second)
		waitFor(t, 60*time.Second, "the containerised deployer to pull its own new image", func() bool {
			img, err := n.cli.InspectImage(selfRef)
			return err == nil && img.ID == v2
		})
		// Two more re-pull cycles (the period is 2s) with its own image stale.
		cycles := strings.Count(s.dockerCLI(n.dockerd, "logs", "self"), "periodic re-pull started")
		logs := ""
		waitFor(t, 60*time.Second, "two re-pull cycles after its own image moved", func() bool {
			logs = s.dockerCLI(n.dockerd, "logs", "self")
			return strings.Count(logs, "periodic re-pull started") >= cycles+2
		})
		if id, img := s.containerImage(n, "self"); id != selfID || img != v1 {
			t.Errorf("the deployer container was stopped or replaced (%s on %s)", shortID(id), shortID(img))
		}
		if !strings.Contains(logs, "stopped stale container") {
			t.Errorf("the containerised deployer stopped nothing:\n%s", logs)
		}
		s.dockerCLI(n.dockerd, "rm", "-f", "self")
		s.record("scenario 16: deployer in a scratch container (static binary, socket mounted) restarted a deployer.managed=true app %s → %s and left itself on %s while %s was pulled",
			shortID(old), shortID(qa), shortID(v1), shortID(v2))
	})
}

func nodeByName(ns []*node, name string) *node {
	for _, n := range ns {
		if n.name == name {
			return n
		}
	}
	return nil
}

// record writes a measured figure to the test log and the results file.
func (s *stack) record(format string, args ...any) {
	line := fmt.Sprintf(format, args...)
	s.t.Log(line)
	fmt.Fprintf(s.results, "%s %s\n", time.Now().Format(time.RFC3339), line)
}

// status reads GET /api/status from node n.
func (s *stack) status(n *node) clusterStatus {
	s.t.Helper()
	req, _ := http.NewRequest("GET", fmt.Sprintf("http://127.0.0.1:%d/api/status", n.port), nil)
	req.Header.Set("Authorization", "Bearer "+s.secret)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	var st clusterStatus
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		s.t.Fatalf("decode /api/status: %v", err)
	}
	return st
}

// sampler counts, every 50 ms, the nodes where container name is not
// running; stop returns the most seen at once and the samples taken.
func (s *stack) sampler(name string) (stop func() (maxDown, samples int)) {
	done := make(chan struct{})
	result := make(chan [2]int)
	go func() {
		maxDown, samples := 0, 0
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			down := 0
			for _, n := range s.nodes {
				if id, _ := s.containerImage(n, name); id == "" {
					down++
				}
			}
			maxDown, samples = max(maxDown, down), samples+1
			select {
			case <-done:
				result <- [2]int{maxDown, samples}
				return
			case <-t.C:
			}
		}
	}()
	return func() (int, int) {
		close(done)
		r := <-result
		return r[0], r[1]
	}
}

// waitSlack waits until, among messages after index from, every node has
// one that contains all of want (with %s replaced by the node name).
func (s *stack) waitSlack(from int, ns []*node, want ...string) {
	s.t.Helper()
	waitFor(s.t, 30*time.Second, fmt.Sprintf("Slack messages %q from %s", want, nodeNames(ns)), func() bool {
		texts := s.slackTexts()
		if from > len(texts) {
			return false
		}
		for _, n := range ns {
			found := false
			for _, text := range texts[from:] {
				ok := strings.Contains(text, " on "+n.name)
				for _, w := range want {
					ok = ok && strings.Contains(text, w)
				}
				found = found || ok
			}
			if !found {
				return false
			}
		}
		return true
	})
}

func (s *stack) revision() int64 {
	resp, err := s.cli.Get(context.Background(), "/e2e-health")
	if err != nil {
		s.t.Fatal(err)
	}
	return resp.Header.Revision
}
