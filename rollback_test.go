package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	memregistry "github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// testImage is one version pushed to the test registry: its manifest
// digest and its image ID (the config digest, as Docker shows it).
type testImage struct {
	digest, id string
}

// rollbackRegistry is go-containerregistry's in-memory registry on
// loopback (plain HTTP, as for a loopback registry), with a switch that
// refuses every manifest write with the given status.
type rollbackRegistry struct {
	srv    *httptest.Server
	host   string
	refuse int          // 0: writes are accepted
	puts   atomic.Int32 // manifest writes accepted
}

func newRollbackRegistry(t *testing.T) *rollbackRegistry {
	t.Helper()
	r := &rollbackRegistry{}
	inner := memregistry.New()
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if r.refuse != 0 && req.Method == http.MethodPut && strings.Contains(req.URL.Path, "/manifests/") {
			code := map[int]string{401: "UNAUTHORIZED", 403: "DENIED", 405: "UNSUPPORTED"}[r.refuse]
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(r.refuse)
			fmt.Fprintf(w, `{"errors":[{"code":%q,"message":"refused by the test"}]}`, code)
			return
		}
		if req.Method == http.MethodPut && strings.Contains(req.URL.Path, "/manifests/") {
			r.puts.Add(1)
		}
		inner.ServeHTTP(w, req)
	}))
	t.Cleanup(r.srv.Close)
	r.host = strings.TrimPrefix(r.srv.URL, "http://")
	return r
}

// push writes a new random image under repo:tag and returns it.
func (r *rollbackRegistry) push(t *testing.T, repoTag string) testImage {
	t.Helper()
	img, err := random.Image(256, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(must(name.NewTag(r.host+"/"+repoTag)), img, remote.WithContext(t.Context())); err != nil {
		t.Fatal(err)
	}
	return testImage{digest: must(img.Digest()).String(), id: must(img.ConfigName()).String()}
}

// tagDigest is the manifest digest repo:tag names now.
func (r *rollbackRegistry) tagDigest(t *testing.T, repoTag string) v1.Hash {
	t.Helper()
	d, err := remote.Head(must(name.NewTag(r.host+"/"+repoTag)), remote.WithContext(t.Context()))
	if err != nil {
		t.Fatal(err)
	}
	return d.Digest
}

// putVersions writes a tag's history as the ledger would have.
func putVersions(t *testing.T, cli clientv3.KV, vs ...ledgerVersion) {
	t.Helper()
	for _, v := range vs {
		b, _ := json.Marshal(v)
		if _, err := cli.Put(t.Context(), historyKey(v.Image, v.Version), string(b)); err != nil {
			t.Fatal(err)
		}
	}
}

// rollbackFixture: three versions of host/app:latest pushed in turn, the
// ledger's outcomes as given, the registry's tag on the third.
type rollbackFixture struct {
	reg  *rollbackRegistry
	kv   clientv3.KV
	ref  string
	imgs []testImage
	rb   *rollbacker
}

func newRollbackFixture(t *testing.T, outcomes ...string) *rollbackFixture {
	t.Helper()
	f := &rollbackFixture{reg: newRollbackRegistry(t), kv: testNS(t)}
	f.ref = f.reg.host + "/app:latest"
	pushed := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	for i, o := range outcomes {
		img := f.reg.push(t, "app:latest")
		f.imgs = append(f.imgs, img)
		putVersions(t, f.kv, ledgerVersion{Version: int64(i + 1), Image: f.ref, ImageID: img.id, Digest: img.digest,
			Pushed: pushed.Add(time.Duration(i) * time.Minute), Outcome: o, AskedBy: askedBy{Source: "registry"}})
	}
	f.rb = newRollbacker(f.kv, "", dockerHub, 20, testLogger(t))
	f.rb.timeout = 10 * time.Second
	return f
}

func TestRollbackTargets(t *testing.T) {
	for _, tc := range []struct {
		name     string
		outcomes []string
		to       func(f *rollbackFixture) string
		want     int // index of the image back under the tag; -1: an error
		wantErr  error
	}{
		{"default: the newest earlier that rolled out", []string{outcomeRolledOut, outcomeRolledOut}, func(*rollbackFixture) string { return "" }, 0, nil},
		{"default skips the halted", []string{outcomeRolledOut, outcomeHalted, outcomeRolledOut}, func(*rollbackFixture) string { return "" }, 0, nil},
		{"default from a halted version", []string{outcomeRolledOut, outcomeRolledOut, outcomeHalted}, func(*rollbackFixture) string { return "" }, 1, nil},
		{"ledger version", []string{outcomeRolledOut, outcomeRolledOut, outcomeRolledOut}, func(*rollbackFixture) string { return "1" }, 0, nil},
		{"digest", []string{outcomeRolledOut, outcomeRolledOut, outcomeRolledOut}, func(f *rollbackFixture) string { return f.imgs[1].digest }, 1, nil},
		{"image ID", []string{outcomeRolledOut, outcomeRolledOut}, func(f *rollbackFixture) string { return f.imgs[0].id }, 0, nil},
		{"short image ID", []string{outcomeRolledOut, outcomeRolledOut}, func(f *rollbackFixture) string { return shortID(f.imgs[0].id) }, 0, nil},
		{"a version not in the ledger", []string{outcomeRolledOut, outcomeRolledOut}, func(*rollbackFixture) string { return "7" }, -1, errLedgerTarget},
		{"a digest not in the ledger", []string{outcomeRolledOut, outcomeRolledOut}, func(*rollbackFixture) string { return "sha256:" + strings.Repeat("0", 64) }, -1, errLedgerTarget},
		{"the current version", []string{outcomeRolledOut, outcomeRolledOut}, func(*rollbackFixture) string { return "2" }, -1, errLedgerTarget},
		{"no earlier version rolled out", []string{outcomeHalted, outcomeRolledOut}, func(*rollbackFixture) string { return "" }, -1, errLedgerTarget},
		{"not a version", []string{outcomeRolledOut, outcomeRolledOut}, func(*rollbackFixture) string { return "latest" }, -1, errUsage},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newRollbackFixture(t, tc.outcomes...)
			last := f.imgs[len(f.imgs)-1]
			res, err := f.rb.rollback(t.Context(), rollbackRequest{Image: f.ref, To: tc.to(f)}, askedBy{Command: "deployer rollback app:latest", Host: "ops1"})
			if tc.want < 0 {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v; want %v", err, tc.wantErr)
				}
				if got := f.reg.tagDigest(t, "app:latest").String(); got != last.digest {
					t.Errorf("the tag moved to %s on a refused rollback", got)
				}
				if vs := readVersions(t, f.kv.(*clientv3.Client), f.ref); len(vs) != len(tc.outcomes) {
					t.Errorf("%d versions in the ledger; want %d: nothing recorded", len(vs), len(tc.outcomes))
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			want := f.imgs[tc.want]
			if got := f.reg.tagDigest(t, "app:latest").String(); got != want.digest {
				t.Errorf("the registry's tag is %s; want %s", got, want.digest)
			}
			if res.ImageID != want.id || res.Digest != want.digest || res.ToVersion != int64(tc.want+1) || res.FromVersion != int64(len(tc.outcomes)) {
				t.Errorf("result %+v; want version %d (%s)", res, tc.want+1, want.id)
			}
			checkRollbackRecorded(t, f, res, "deployer rollback app:latest", "ops1")
		})
	}
}

// checkRollbackRecorded checks the ledger and the trigger a rollback wrote.
func checkRollbackRecorded(t *testing.T, f *rollbackFixture, res rollbackResult, command, host string) {
	t.Helper()
	vs := readVersions(t, f.kv.(*clientv3.Client), f.ref) // newest first
	if len(vs) < 2 {
		t.Fatalf("%d versions", len(vs))
	}
	added, bad := vs[0], vs[1]
	if bad.Version != res.FromVersion || bad.Outcome != outcomeRolledBack {
		t.Errorf("version %d: outcome %q; want %q", bad.Version, bad.Outcome, outcomeRolledBack)
	}
	if added.Version != res.Version || added.ImageID != res.ImageID || added.Digest != res.Digest || added.Outcome != outcomeRollingOut ||
		added.AskedBy.Source != "rollback" || added.AskedBy.Command != command || added.AskedBy.Host != host || added.Revision != res.Revision {
		t.Errorf("the version added: %+v; want version %d of %s asked by %q on %s at revision %d", added, res.Version, res.ImageID, command, host, res.Revision)
	}
	resp, err := f.kv.Get(t.Context(), triggerKey(strings.TrimSuffix(f.ref, ":latest")))
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("trigger: %v, %d keys", err, len(resp.Kvs))
	}
	var tr trigger
	if err := json.Unmarshal(resp.Kvs[0].Value, &tr); err != nil {
		t.Fatal(err)
	}
	if tr.Tag != "latest" || tr.Digest != res.Digest || tr.Source != "rollback" || resp.Kvs[0].ModRevision != res.Revision {
		t.Errorf("trigger %+v at revision %d; want tag latest, digest %s, source rollback, revision %d", tr, resp.Kvs[0].ModRevision, res.Digest, res.Revision)
	}
	tags, digests := parseTrigger(resp.Kvs[0].Value)
	if len(tags) != 1 || digests["latest"] != res.Digest {
		t.Errorf("the watcher reads tags %v digests %v", tags, digests)
	}
	// The watcher handles the first event of a revision only: the
	// trigger must be it.
	wctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	wr := <-f.kv.(*clientv3.Client).Watch(wctx, "/", clientv3.WithPrefix(), clientv3.WithRev(res.Revision))
	if len(wr.Events) == 0 || string(wr.Events[0].Kv.Key) != string(resp.Kvs[0].Key) {
		t.Errorf("the rollback's first event is not its trigger: %v", wr.Events)
	}
}

// TestRollbackRegistryRefuses: the registry refuses the write; the
// rollback says why in one line and pins the fleet to the old version
// instead, recorded with the rollback and its trigger in one transaction.
func TestRollbackRegistryRefuses(t *testing.T) {
	for _, tc := range []struct {
		status int
		reason string
	}{
		{http.StatusUnauthorized, "no push rights"},
		{http.StatusForbidden, "push denied"},
		{http.StatusMethodNotAllowed, "read-only"},
	} {
		t.Run(http.StatusText(tc.status), func(t *testing.T) {
			f := newRollbackFixture(t, outcomeRolledOut, outcomeRolledOut)
			f.reg.refuse = tc.status
			b, _ := json.Marshal(nodeStatus{Node: "n2", Containers: []containerStatus{
				{Name: "web", Image: f.ref, ImageID: f.imgs[1].id, Strategy: strategyStop},
				{Name: "api", Image: f.ref, ImageID: f.imgs[1].id, Strategy: strategyRecr},
			}})
			if _, err := f.kv.Put(t.Context(), statusKey("n2"), string(b)); err != nil {
				t.Fatal(err)
			}
			asked := askedBy{Command: "deployer rollback app:latest", Host: "ops1"}
			res, err := f.rb.rollback(t.Context(), rollbackRequest{Image: f.ref}, asked)
			if err != nil {
				t.Fatalf("rollback = %v; want the pin fallback", err)
			}
			if !strings.Contains(res.Refused, "registry "+f.reg.host) || !strings.Contains(res.Refused, tc.reason) || strings.Contains(res.Refused, "\n") {
				t.Errorf("the line %q does not name the registry %s and the reason %q", res.Refused, f.reg.host, tc.reason)
			}
			if got := f.reg.tagDigest(t, "app:latest").String(); got != f.imgs[1].digest {
				t.Errorf("the registry's tag moved to %s", got)
			}
			pin, _, err := readPin(t.Context(), f.kv, f.ref)
			if err != nil || pin == nil || pin.ImageID != f.imgs[0].id || pin.Version != 1 || pin.Reason != res.Refused || pin.AskedBy.Command != asked.Command {
				t.Fatalf("pin %+v, %v; want version 1 (%s), asked by the rollback, with the registry's line", pin, err, f.imgs[0].id)
			}
			if !res.Pinned || res.ToVersion != 1 || !slices.Equal(res.Warnings, []string{"n2/web"}) {
				t.Errorf("result %+v; want pinned to version 1, warning about n2/web only", res)
			}
			lines := res.lines(asked)
			if len(lines) != 3 || lines[0] != res.Refused || !strings.Contains(lines[1], "pinned fleet-wide to version 1") || !strings.Contains(lines[2], "n2/web") {
				t.Errorf("the rollback says:\n%s", strings.Join(lines, "\n"))
			}
			// The rollback is recorded (version 2 rolled back: quarantined)
			// in the transaction of the pin and of a trigger without a
			// digest (the registry still serves version 2's).
			vs := readVersions(t, f.kv.(*clientv3.Client), f.ref)
			if len(vs) != 3 || vs[1].Outcome != outcomeRolledBack || vs[0].ImageID != f.imgs[0].id {
				t.Errorf("the ledger: %+v", vs)
			}
			resp, err := f.kv.Get(t.Context(), triggerKey(f.reg.host+"/app"))
			if err != nil || len(resp.Kvs) != 1 {
				t.Fatalf("trigger: %v, %v", err, resp)
			}
			pk, _ := f.kv.Get(t.Context(), pinKey(f.ref))
			var tr trigger
			_ = json.Unmarshal(resp.Kvs[0].Value, &tr)
			if resp.Kvs[0].ModRevision != res.Revision || pk.Kvs[0].ModRevision != res.Revision || tr.Digest != "" || tr.Tag != "latest" {
				t.Errorf("trigger %+v at %d, pin at %d; want both at the rollback's revision %d, no digest", tr, resp.Kvs[0].ModRevision, pk.Kvs[0].ModRevision, res.Revision)
			}
		})
	}
}

// A node's write to the bad version between the read and the record:
// the record is tried again and keeps the node's part.
func TestRollbackRecordKeepsNodeWrites(t *testing.T) {
	f := newRollbackFixture(t, outcomeRolledOut, outcomeRollingOut)
	l := testLedger(t, f.kv.(*clientv3.Client), "n1", 20)
	if err := l.apply(t.Context(), ledgerEntry{Ref: f.ref, Repo: f.reg.host + "/app", ImageID: f.imgs[1].id, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	res, err := f.rb.rollback(t.Context(), rollbackRequest{Image: f.ref}, askedBy{Command: "c", Host: "h"})
	if err != nil {
		t.Fatal(err)
	}
	checkRollbackRecorded(t, f, res, "c", "h")
	vs := readVersions(t, f.kv.(*clientv3.Client), f.ref)
	if vs[1].Nodes["n1"].Converged.IsZero() {
		t.Errorf("n1's convergence on version 2 was lost: %+v", vs[1])
	}
	// The nodes then converge on the rollback's version, not a new one.
	if err := l.apply(t.Context(), ledgerEntry{Ref: f.ref, Repo: f.reg.host + "/app", ImageID: f.imgs[0].id, Revision: res.Revision, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	vs = readVersions(t, f.kv.(*clientv3.Client), f.ref)
	if len(vs) != 3 || vs[0].Nodes["n1"].Converged.IsZero() || vs[0].Outcome != outcomeRolledOut {
		t.Errorf("after n1 converged: %+v", vs)
	}
}

func TestRollbackCommandAndAPI(t *testing.T) {
	f := newRollbackFixture(t, outcomeRolledOut, outcomeRolledOut, outcomeRolledOut)
	var out, errOut bytes.Buffer
	args := []string{f.ref, "-to", "1", "-etcd_nodes", sharedEtcdURL, "-etcd_prefix", testPrefix(t), "-dockercfg", ""}
	if err := rollbackCommand(t.Context(), args, &out, &errOut); err != nil {
		t.Fatal(err, errOut.String())
	}
	if got := f.reg.tagDigest(t, "app:latest").String(); got != f.imgs[0].digest {
		t.Errorf("the registry's tag is %s; want version 1's %s", got, f.imgs[0].digest)
	}
	if !strings.Contains(out.String(), "version 3") || !strings.Contains(out.String(), shortID(f.imgs[0].id)) {
		t.Errorf("output: %s", out.String())
	}
	vs := readVersions(t, f.kv.(*clientv3.Client), f.ref)
	if vs[0].AskedBy.Command != "deployer rollback "+f.ref+" -to 1" || vs[0].AskedBy.Host == "" {
		t.Errorf("asked by %+v", vs[0].AskedBy)
	}

	// POST /api/rollback, the same code path, behind the webhook secret.
	h, _ := newTestWebhook(t, testEtcd(t), "s3cret")
	handler := rollbackHandler(h, f.rb, "n1", nil)
	bearer := map[string]string{"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
	for _, tc := range []struct {
		name string
		req  hookRequest
		code int
	}{
		{"no secret", hookRequest{target: "/api/rollback", body: `{"image":"` + f.ref + `"}`}, 401},
		{"GET", hookRequest{method: "GET", target: "/api/rollback", headers: bearer}, 405},
		{"no image", hookRequest{target: "/api/rollback", headers: bearer, body: `{}`}, 400},
		{"not in the ledger", hookRequest{target: "/api/rollback", headers: bearer, body: `{"image":"` + f.ref + `","to":"9"}`}, 400},
		{"to version 2", hookRequest{target: "/api/rollback", headers: bearer, body: `{"image":"` + f.ref + `","to":"2"}`}, 200},
	} {
		w := serveHook(t, handler, tc.req)
		if w.Code != tc.code {
			t.Errorf("%s: %d %s; want %d", tc.name, w.Code, w.Body, tc.code)
		}
	}
	if got := f.reg.tagDigest(t, "app:latest").String(); got != f.imgs[1].digest {
		t.Errorf("after POST /api/rollback the registry's tag is %s; want version 2's %s", got, f.imgs[1].digest)
	}
	vs = readVersions(t, f.kv.(*clientv3.Client), f.ref)
	if vs[0].Version != 5 || vs[0].ImageID != f.imgs[1].id || vs[0].AskedBy.Command != "POST /api/rollback" || vs[1].Outcome != outcomeRolledBack {
		t.Errorf("after POST /api/rollback: %+v", vs[:2])
	}
	f.reg.refuse = http.StatusUnauthorized
	w := serveHook(t, handler, hookRequest{target: "/api/rollback", headers: bearer, body: `{"image":"` + f.ref + `","to":"1"}`})
	var res rollbackResult
	if err := json.Unmarshal(w.Body.Bytes(), &res); w.Code != http.StatusOK || err != nil || !res.Pinned || !strings.Contains(res.Refused, "no push rights") {
		t.Errorf("refused: %d %s; want 200, pinned, the registry's line", w.Code, w.Body)
	}
}
