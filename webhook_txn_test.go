package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/die-net/deployer/internal/etcdc"
)

// flakyKV is an etcd whose second single write fails (a leader change in
// the middle of an envelope); transactions go through.
type flakyKV struct {
	*clientv3.Client
	mu   sync.Mutex
	puts int
}

func (f *flakyKV) Put(ctx context.Context, key, val string, opts ...clientv3.OpOption) (*clientv3.PutResponse, error) {
	f.mu.Lock()
	f.puts++
	n := f.puts
	f.mu.Unlock()
	if n == 2 {
		return nil, errors.New("etcdserver: leader changed")
	}
	return f.Client.Put(ctx, key, val, opts...)
}

func pushEvent(repo, tag, digest string) map[string]any {
	return map[string]any{
		"action":  "push",
		"target":  map[string]any{"mediaType": "application/vnd.oci.image.manifest.v1+json", "repository": repo, "tag": tag, "digest": digest},
		"request": map[string]any{"host": "r:5000"},
	}
}

func envelope(events ...map[string]any) string {
	b, _ := json.Marshal(map[string]any{"events": events})
	return string(b)
}

// TestRegistryEnvelopeOneTxn: every trigger of one envelope is written at
// once (one revision), several tags of one repository in one trigger; a
// failure writes none; an envelope beyond the cap is refused with 413.
func TestRegistryEnvelopeOneTxn(t *testing.T) {
	cli := testEtcd(t)
	kv := &flakyKV{Client: etcdc.InPrefix(cli, testPrefix(t))}
	h, _ := newTestWebhook(t, kv, "s")
	d1, d2, d3 := "sha256:"+strings.Repeat("1", 64), "sha256:"+strings.Repeat("2", 64), "sha256:"+strings.Repeat("3", 64)
	body := envelope(pushEvent("a", "qa", d1), pushEvent("b", "qa", d2), pushEvent("a", "prod", d3))
	w := httptest.NewRecorder()
	h.registry(w, httptest.NewRequest("POST", "/reg?token=s", strings.NewReader(body)))
	if w.Code != 200 {
		t.Fatalf("status %d (%s); want 200 with every trigger written", w.Code, w.Body)
	}
	var got struct{ Triggered []triggered }
	if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if len(got.Triggered) != 3 {
		t.Fatalf("triggered %+v; want 3 pushes", got.Triggered)
	}
	for _, tr := range got.Triggered {
		if tr.Revision != got.Triggered[0].Revision {
			t.Errorf("triggers written at revisions %+v; want one transaction", got.Triggered)
		}
	}
	resp, err := cli.Get(t.Context(), h.prefix+triggerKey("r:5000/a"))
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("get a: %v %v", resp, err)
	}
	tags, digests := parseTrigger(resp.Kvs[0].Value)
	if strings.Join(tags, ",") != "qa,prod" || digests["qa"] != d1 || digests["prod"] != d3 {
		t.Errorf("trigger of a = %s; want tags qa,prod with their digests", resp.Kvs[0].Value)
	}
	if n := countKeys(t, cli, h.prefix); n != 2 {
		t.Errorf("%d keys; want 2", n)
	}

	// A failing etcd writes nothing of the envelope: 503, and the
	// registry's retry is the only write.
	h2, _ := newTestWebhook(t, failingKV{errors.New("etcdserver: request timed out")}, "s")
	w = httptest.NewRecorder()
	h2.registry(w, httptest.NewRequest("POST", "/reg?token=s", strings.NewReader(body)))
	if w.Code != 503 {
		t.Errorf("etcd down: status %d; want 503", w.Code)
	}

	// Beyond the cap: 413, nothing written.
	var many []map[string]any
	for i := range maxEnvelopePushes + 1 {
		many = append(many, pushEvent(fmt.Sprintf("many/r%d", i), "qa", ""))
	}
	h3, _ := newTestWebhookUnder(t, cli, h.prefix+"-many", "s")
	w = httptest.NewRecorder()
	h3.registry(w, httptest.NewRequest("POST", "/reg?token=s", strings.NewReader(envelope(many...))))
	if w.Code != 413 {
		t.Errorf("%d pushes in one envelope: status %d; want 413", len(many), w.Code)
	}
	if n := countKeys(t, cli, h3.prefix); n != 0 {
		t.Errorf("%d keys written by a refused envelope; want 0", n)
	}
	// At the cap: accepted, in one transaction.
	w = httptest.NewRecorder()
	h3.registry(w, httptest.NewRequest("POST", "/reg?token=s", strings.NewReader(envelope(many[:maxEnvelopePushes]...))))
	if w.Code != 200 {
		t.Errorf("%d pushes: status %d (%s); want 200", maxEnvelopePushes, w.Code, w.Body)
	}
}
