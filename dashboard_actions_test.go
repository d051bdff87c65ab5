package main

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// The tag the action tests act on, as the records store it, and its two
// versions in the ledger.
const (
	actRef = "docker.io/library/app:latest"
	actOld = "sha256:1111111111111111111111111111111111111111111111111111111111111111"
	actNew = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
)

// actionDashboard is a dashboard on the test's etcd prefix offering every
// action but rollback (which needs a registry: dashboard_test.go's and the
// browser test's), with its session cookie and CSRF token.
func actionDashboard(t *testing.T) (*clientv3.Client, http.Handler, *http.Cookie, string, *[]string) {
	t.Helper()
	cli := testNS(t)
	base := basePolicy(unavailable{N: 1}, time.Second)
	var said []string
	d := newDashboard(cli, func() string { return "s3cret" }, newFailLimiter(), dashOps{
		pins:     newPinner(cli, "docker.io", 10),
		canaries: newCanaries(cli, newPolicies(cli, base), nil, "n1", nil, nil, nil, "docker.io", testLogger(t)),
		holds:    newHoldOps(cli, base, "docker.io", testLogger(t)),
		say:      func(s string) { said = append(said, s) },
	}, "n1", 1, testLogger(t))
	h := dashMux(d)
	c := sessionCookie(dashLogin(t, h, "s3cret", false)) //nolint:bodyclose // an httptest recorder's in-memory body
	id, _, _ := d.auth.session(c.Value)
	return cli, h, c, d.auth.csrfToken(id), &said
}

func putJSON(t *testing.T, cli clientv3.KV, key string, v any) {
	t.Helper()
	b, _ := json.Marshal(v)
	if _, err := cli.Put(t.Context(), key, string(b)); err != nil {
		t.Fatal(err)
	}
}

// getJSON reads key into v; false when there is no key.
func getJSON(t *testing.T, cli clientv3.KV, key string, v any) bool {
	t.Helper()
	resp, err := cli.Get(t.Context(), key)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		return false
	}
	if err := json.Unmarshal(resp.Kvs[0].Value, v); err != nil {
		t.Fatalf("%s: %v", key, err)
	}
	return true
}

// seedLedger records two versions of actRef, both rolled out.
func seedLedger(t *testing.T, cli clientv3.KV) {
	t0 := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	for i, id := range []string{actOld, actNew} {
		v := int64(i + 1)
		putJSON(t, cli, historyKey(actRef, v), ledgerVersion{
			Version: v, Image: actRef, ImageID: id, Pushed: t0.Add(time.Duration(i) * time.Hour),
			Nodes: map[string]nodeResult{"n1": {Converged: t0}}, Outcome: outcomeRolledOut,
		})
	}
}

func seedCanary(t *testing.T, cli clientv3.KV) {
	putJSON(t, cli, canaryKey(actRef), canaryRecord{ImageID: actNew, Previous: actOld, Phase: phaseWaiting, Promotion: promoteManual, Since: time.Now().UTC()})
}

// askedFromDashboard says what is wrong with by, a record's who-asked
// text, for the dashboard's action from remote ("" when nothing).
func askedFromDashboard(by, action, remote string) string {
	if !strings.Contains(by, "dashboard "+action) || !strings.Contains(by, remote) {
		return "asked by " + by + "; want the dashboard's " + action + " from " + remote
	}
	return ""
}

// TestDashActions runs each action through POST /ui/action/{name} as the
// page does, and checks what it did in etcd and who it says asked; the
// same post without the CSRF token does nothing.
func TestDashActions(t *testing.T) {
	for _, tc := range []struct {
		action string
		body   string
		seed   func(t *testing.T, cli *clientv3.Client)
		check  func(t *testing.T, cli *clientv3.Client, remote string) string // what is wrong, "" when nothing
	}{
		{"pin", `{"image":"app:latest"}`, func(t *testing.T, cli *clientv3.Client) { seedLedger(t, cli) },
			func(t *testing.T, cli *clientv3.Client, remote string) string {
				var p pinRecord
				if !getJSON(t, cli, pinKey(actRef), &p) {
					return "no pin recorded"
				}
				if p.ImageID != actNew || p.AskedBy.Command != "dashboard pin" || p.AskedBy.Remote != remote || p.AskedBy.Node != "n1" {
					return "pin " + p.ImageID + " asked by " + p.AskedBy.who() + "; want " + actNew + " asked by the dashboard from " + remote
				}
				return ""
			}},
		{"unpin", `{"image":"app:latest"}`, func(t *testing.T, cli *clientv3.Client) {
			seedLedger(t, cli)
			if _, _, err := newPinner(cli, "docker.io", 10).pin(t.Context(), pinRequest{Image: actRef}, askedBy{Command: "test"}); err != nil {
				t.Fatal(err)
			}
		}, func(t *testing.T, cli *clientv3.Client, remote string) string {
			var p pinRecord
			if getJSON(t, cli, pinKey(actRef), &p) {
				return "still pinned"
			}
			var tr trigger
			if !getJSON(t, cli, triggerKey("docker.io/library/app"), &tr) || tr.Source != "unpin" || tr.Remote != remote || tr.Node != "n1" {
				return "the unpin's trigger " + tr.Source + " from " + tr.Remote + " at " + tr.Node + "; want unpin from " + remote + " at n1"
			}
			return ""
		}},
		{"promote", `{"image":"app:latest"}`, func(t *testing.T, cli *clientv3.Client) { seedCanary(t, cli) },
			func(t *testing.T, cli *clientv3.Client, remote string) string {
				var rec canaryRecord
				if getJSON(t, cli, canaryKey(actRef), &rec); rec.Phase != phasePromoted {
					return "canary rollout " + rec.Phase + "; want promoted"
				}
				var tr trigger
				if !getJSON(t, cli, triggerKey("docker.io/library/app"), &tr) || tr.Source != "promote" {
					return "no promote trigger"
				}
				return askedFromDashboard(rec.By, "promote", remote)
			}},
		{"abort", `{"image":"app:latest"}`, func(t *testing.T, cli *clientv3.Client) { seedCanary(t, cli) },
			func(t *testing.T, cli *clientv3.Client, remote string) string {
				var rec canaryRecord
				if getJSON(t, cli, canaryKey(actRef), &rec); rec.Phase != phaseAborted {
					return "canary rollout " + rec.Phase + "; want aborted"
				}
				var h halt
				if !getJSON(t, cli, haltKey(actRef), &h) || h.ImageID != actNew {
					return "no halt of " + actNew
				}
				return askedFromDashboard(rec.By, "abort", remote)
			}},
		{"freeze", `{"scope":"app:latest"}`, nil,
			func(t *testing.T, cli *clientv3.Client, remote string) string {
				var f freezeRecord
				if !getJSON(t, cli, freezeKey(actRef), &f) {
					return "no freeze of " + actRef
				}
				return askedFromDashboard(f.By, "freeze", remote)
			}},
		{"freeze", `{}`, nil,
			func(t *testing.T, cli *clientv3.Client, remote string) string {
				var f freezeRecord
				if !getJSON(t, cli, freezeKey(freezeAll), &f) {
					return "no freeze of every image"
				}
				return askedFromDashboard(f.By, "freeze", remote)
			}},
		{"thaw", `{"scope":"app:latest"}`, func(t *testing.T, cli *clientv3.Client) {
			if _, err := newHoldOps(cli, basePolicy(unavailable{N: 1}, time.Second), "docker.io", testLogger(t)).
				freeze(t.Context(), freezeRequest{Scope: actRef}, "test"); err != nil {
				t.Fatal(err)
			}
			putJSON(t, cli, waitingKey(actRef), waitingRecord{Ref: actRef, Repo: "app", ImageID: actNew, Reason: "frozen", Since: time.Now().UTC(), Node: "n2"})
		}, func(t *testing.T, cli *clientv3.Client, remote string) string {
			var f freezeRecord
			if getJSON(t, cli, freezeKey(actRef), &f) {
				return "still frozen"
			}
			var tr trigger
			if !getJSON(t, cli, triggerKey("app"), &tr) {
				return "the waiting version was not released"
			}
			if tr.Source != "dashboard thaw" || tr.Remote != remote || tr.Node != "n1" {
				return "the release's trigger asked by " + tr.Source + " from " + tr.Remote + " at " + tr.Node + "; want the dashboard's thaw from " + remote + " at n1"
			}
			return ""
		}},
		{"thaw", `{}`, func(t *testing.T, cli *clientv3.Client) {
			if _, err := newHoldOps(cli, basePolicy(unavailable{N: 1}, time.Second), "docker.io", testLogger(t)).
				freeze(t.Context(), freezeRequest{}, "test"); err != nil {
				t.Fatal(err)
			}
		}, func(t *testing.T, cli *clientv3.Client, remote string) string {
			var f freezeRecord
			if getJSON(t, cli, freezeKey(freezeAll), &f) {
				return "every image still frozen"
			}
			return ""
		}},
	} {
		for _, csrf := range []bool{true, false} {
			name := tc.action + " " + tc.body
			if !csrf {
				name += " without the CSRF token"
			}
			t.Run(name, func(t *testing.T) {
				cli, h, cookie, token, said := actionDashboard(t)
				if tc.seed != nil {
					tc.seed(t, cli)
				}
				before, err := cli.Get(t.Context(), "/", clientv3.WithPrefix())
				if err != nil {
					t.Fatal(err)
				}
				r := httptest.NewRequest("POST", "/ui/action/"+tc.action, strings.NewReader(tc.body))
				r.Header.Set("Content-Type", "application/json")
				r.Header.Set("Sec-Fetch-Site", "same-origin")
				r.AddCookie(cookie)
				if csrf {
					r.Header.Set(csrfHeader, token)
				}
				w := httptest.NewRecorder()
				h.ServeHTTP(w, r)
				if !csrf {
					after, err := cli.Get(t.Context(), "/", clientv3.WithPrefix())
					if err != nil {
						t.Fatal(err)
					}
					if w.Code != http.StatusForbidden || after.Header.Revision != before.Header.Revision {
						t.Fatalf("POST /ui/action/%s without the CSRF token: %d, etcd revision %d -> %d; want 403 and nothing written (%s)",
							tc.action, w.Code, before.Header.Revision, after.Header.Revision, w.Body.String())
					}
					return
				}
				if w.Code != http.StatusOK {
					t.Fatalf("POST /ui/action/%s %s: %d %s; want 200", tc.action, tc.body, w.Code, w.Body.String())
				}
				if problem := tc.check(t, cli, r.RemoteAddr); problem != "" {
					t.Errorf("POST /ui/action/%s %s: %s (answered %s)", tc.action, tc.body, problem, w.Body.String())
				}
				if (tc.action == "pin" || tc.action == "unpin") && (len(*said) != 1 || !strings.Contains((*said)[0], "dashboard "+tc.action)) {
					t.Errorf("announced %q; want one announcement naming the dashboard's %s", *said, tc.action)
				}
			})
		}
	}
}

// TestDashActionsRefused: an action that does not apply is refused with
// the status the API gives, and writes nothing.
func TestDashActionsRefused(t *testing.T) {
	for _, tc := range []struct {
		action, body string
		want         int
	}{
		{"pin", `{"image":"app:latest"}`, http.StatusBadRequest}, // no version in the ledger
		{"pin", `{}`, http.StatusBadRequest},
		{"unpin", `{"image":"app:latest"}`, http.StatusBadRequest}, // not pinned
		{"promote", `{"image":"app:latest"}`, http.StatusNotFound},
		{"abort", `{"image":"app:latest"}`, http.StatusNotFound},
		{"thaw", `{"scope":"app:latest"}`, http.StatusNotFound},
		{"freeze", `{"scope":"app@sha256:` + strings.Repeat("a", 64) + `"}`, http.StatusBadRequest},
	} {
		t.Run(tc.action+" "+tc.body, func(t *testing.T) {
			cli, h, cookie, token, _ := actionDashboard(t)
			r := httptest.NewRequest("POST", "/ui/action/"+tc.action, strings.NewReader(tc.body))
			r.Header.Set("Sec-Fetch-Site", "same-origin")
			r.Header.Set(csrfHeader, token)
			r.AddCookie(cookie)
			w := httptest.NewRecorder()
			h.ServeHTTP(w, r)
			resp, err := cli.Get(context.Background(), "/", clientv3.WithPrefix(), clientv3.WithCountOnly())
			if err != nil {
				t.Fatal(err)
			}
			if w.Code != tc.want || resp.Count != 0 {
				t.Errorf("POST /ui/action/%s %s: %d, %d keys written; want %d, none (%s)", tc.action, tc.body, w.Code, resp.Count, tc.want, w.Body.String())
			}
		})
	}
}

// TestDashViewOffers: the view says what the page's actions need to know
// of a tag (its pin, its open canary rollout, the freezes that hold it)
// and whether every image is frozen.
func TestDashViewOffers(t *testing.T) {
	for _, tc := range []struct {
		name    string
		seed    func(t *testing.T, cli *clientv3.Client)
		pinned  bool
		canary  string
		freezes []string
		frozen  bool
	}{
		{"nothing", func(*testing.T, *clientv3.Client) {}, false, "", nil, false},
		{"pinned", func(t *testing.T, cli *clientv3.Client) {
			putJSON(t, cli, pinKey(actRef), pinRecord{Image: actRef, Version: 1, ImageID: actOld})
			putJSON(t, cli, pinKey("docker.io/library/app:other"), pinRecord{Image: "docker.io/library/app:other", Version: 1, ImageID: actOld})
		}, true, "", nil, false},
		{"canary waiting", func(t *testing.T, cli *clientv3.Client) { seedCanary(t, cli) }, false, phaseWaiting, nil, false},
		{"canary promoted", func(t *testing.T, cli *clientv3.Client) {
			putJSON(t, cli, canaryKey(actRef), canaryRecord{ImageID: actNew, Phase: phasePromoted})
		}, false, "", nil, false},
		{"frozen: the tag, its repository, every image", func(t *testing.T, cli *clientv3.Client) {
			for _, scope := range []string{actRef, "docker.io/library/app", "docker.io/library/other:latest", freezeAll} {
				putJSON(t, cli, freezeKey(scope), freezeRecord{Scope: scope})
			}
		}, false, "", []string{"docker.io/library/app", actRef}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cli := testNS(t)
			seedLedger(t, cli)
			tc.seed(t, cli)
			v, err := readDashView(t.Context(), cli, "n1", 1, nil, time.Now())
			if err != nil {
				t.Fatal(err)
			}
			i := slices.IndexFunc(v.Tags, func(tag dashTag) bool { return tag.Image == actRef })
			if i < 0 {
				t.Fatalf("tags %+v; want %s", v.Tags, actRef)
			}
			tag := v.Tags[i]
			phase := ""
			if tag.Canary != nil {
				phase = tag.Canary.Phase
			}
			if (tag.Pin != nil) != tc.pinned || phase != tc.canary || strings.Join(tag.Freezes, " ") != strings.Join(tc.freezes, " ") || v.Frozen != tc.frozen {
				t.Errorf("pin %v, canary %q, freezes %q, fleet frozen %v; want pinned %v, canary %q, freezes %q, fleet frozen %v",
					tag.Pin, phase, tag.Freezes, v.Frozen, tc.pinned, tc.canary, tc.freezes, tc.frozen)
			}
		})
	}
}
