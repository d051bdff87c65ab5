package main

import (
	"encoding/json"
	"strings"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"
)

func TestRollbackHalted(t *testing.T) {
	t.Run("the halted version in the ledger", func(t *testing.T) {
		f := newRollbackFixture(t, outcomeRolledOut, outcomeRollingOut)
		done, err := rollbackHalted(f.rb, "n1")(t.Context(), testTagged(f.ref), f.imgs[0].id)
		if err != nil || !strings.Contains(done, "rolled back to "+shortID(f.imgs[0].id)) {
			t.Fatalf("rollbackHalted = %q, %v; want rolled back", done, err)
		}
		if got := f.reg.tagDigest(t, "app:latest").String(); got != f.imgs[0].digest {
			t.Errorf("the registry's tag is %s; want %s", got, f.imgs[0].digest)
		}
		if vs := readVersions(t, f.kv.(*clientv3.Client), f.ref); vs[1].Outcome != outcomeRolledBack {
			t.Errorf("the halted version's outcome %q; want %q", vs[1].Outcome, outcomeRolledBack)
		}
	})
	t.Run("no node recorded the halted version yet", func(t *testing.T) {
		f := newRollbackFixture(t, outcomeRolledOut)
		f.reg.push(t, "app:latest") // the halted version: in the registry, not in the ledger
		done, err := rollbackHalted(f.rb, "n1")(t.Context(), testTagged(f.ref), f.imgs[0].id)
		if err != nil || !strings.Contains(done, "the ledger had not recorded") {
			t.Fatalf("rollbackHalted = %q, %v; want the registry's tag put back", done, err)
		}
		if got := f.reg.tagDigest(t, "app:latest").String(); got != f.imgs[0].digest {
			t.Errorf("the registry's tag is %s; want %s", got, f.imgs[0].digest)
		}
		resp, err := f.kv.Get(t.Context(), triggerKey(strings.TrimSuffix(f.ref, ":latest")))
		if err != nil || len(resp.Kvs) != 1 {
			t.Fatalf("trigger: %v, %+v", err, resp)
		}
		var tr trigger
		if json.Unmarshal(resp.Kvs[0].Value, &tr) != nil || tr.Source != "rollback" || tr.Digest != f.imgs[0].digest || tr.Tag != "latest" {
			t.Errorf("trigger %s; want the previous digest, source rollback", resp.Kvs[0].Value)
		}
	})
	t.Run("nothing to go back to", func(t *testing.T) {
		f := newRollbackFixture(t, outcomeRolledOut)
		if _, err := rollbackHalted(f.rb, "n1")(t.Context(), testTagged(f.ref), "sha256:"+strings.Repeat("9", 64)); err == nil {
			t.Error("rollbackHalted to an image not in the ledger: nil error")
		}
	})
}
