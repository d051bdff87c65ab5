package main

// tagpolicy.go: what a tag's effective policy (policy.go) says to the
// replacement of its containers: max_unavailable as a count, a
// percentage taken of the containers that run the tag across the cluster
// (as the nodes' status records list them), and the up duration.

import (
	"context"
	"encoding/json"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// forTag returns the replacement settings of ref (an image ref such as
// docker.io/myorg/foo:latest) from its effective policy.
func (ps *policies) forTag(ctx context.Context, ref string) (*tagPolicy, rolloutPolicy, error) {
	p, err := ps.effective(ctx, ref)
	if err != nil {
		return nil, p, err
	}
	tp := &tagPolicy{maxUnavailable: p.MaxUnavailable.N, upAfter: p.UpAfter}
	if p.MaxUnavailable.Percent {
		n, err := clusterContainers(ctx, ps.kv, ref)
		if err != nil {
			return nil, p, err
		}
		tp.maxUnavailable = p.MaxUnavailable.of(n)
	}
	return tp, p, nil
}

// clusterContainers counts the containers started from ref on every node,
// as the nodes' status records list them.
func clusterContainers(ctx context.Context, kv clientv3.KV, ref string) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	resp, err := kv.Get(ctx, statusPrefix, clientv3.WithPrefix())
	if err != nil {
		return 0, fmt.Errorf("count the containers of %s: %w", ref, err)
	}
	n := 0
	for _, kv := range resp.Kvs {
		var st nodeStatus
		if json.Unmarshal(kv.Value, &st) != nil {
			continue
		}
		for _, c := range st.Containers {
			if c.Image == ref {
				n++
			}
		}
	}
	return n, nil
}
