package main

// cmd_status.go: deployer status, the cluster view as a table or JSON.

import (
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// statusCommand is `deployer status`: the cluster status as a table.
func statusCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var asJSON bool
	ce, err := parseCommand("deployer status", args, os.Getenv, stderr, func(fs *flag.FlagSet) {
		fs.BoolVar(&asJSON, "json", false, "print JSON instead of a table")
	})
	if err != nil {
		return err
	}
	var st clusterStatus
	err = ce.read(ctx, stderr, func(ctx context.Context, kv clientv3.KV) (err error) {
		st, err = readStatus(ctx, kv, time.Now())
		return err
	})
	if err != nil {
		return fmt.Errorf("read status from %s: %w", strings.Join(ce.cfg.etcdEndpoints(), ","), err)
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	printStatus(stdout, st)
	return nil
}

func printStatus(w io.Writer, st clusterStatus) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IMAGE\tIMAGE ID\tNODES\tCONTAINERS\tSINCE\tSTATE")
	for _, t := range st.Tags {
		state := "ok"
		switch {
		case len(t.Ahead) > 0:
			state = "AHEAD: " + strings.Join(t.Ahead, ", ") + " run a version that waits"
		case t.Waiting != nil:
			state = fmt.Sprintf("waiting: %s since %s ago: %s", shortID(t.Waiting.ImageID), st.Time.Sub(t.Waiting.Since).Round(time.Second), t.Waiting.Reason)
		case t.Canary != nil && t.Canary.Phase != phasePromoted:
			state = fmt.Sprintf("canary %s: %s", shortID(t.Canary.ImageID), t.Canary.State)
		case t.Halted != nil:
			state = fmt.Sprintf("HALTED: %s on %s: %s", shortID(t.Halted.ImageID), t.Halted.Node, t.Halted.Reason)
		case len(t.Rolling) > 0:
			state = "rolling: " + strings.Join(t.Rolling, ", ")
		case len(t.Down) > 0:
			state = "down: " + strings.Join(t.Down, ", ")
		case len(t.Versions) > 1:
			state = fmt.Sprintf("skew %s", (time.Duration(t.SkewSeconds) * time.Second).String())
		}
		switch {
		case t.State != "" && state == "ok":
			state = t.State
		case t.State != "":
			state = t.State + "; " + state
		}
		if p := t.Pinned; p != nil {
			state = fmt.Sprintf("PINNED to version %d (%s) by %s since %s; %s", p.Version, shortID(p.ImageID), p.AskedBy.who(),
				p.Time.Format(time.RFC3339), state)
		}
		name := t.Image
		if len(t.Versions) == 0 {
			fmt.Fprintf(tw, "%s\t-\t-\t0\t-\t%s\n", name, state)
		}
		for i, v := range t.Versions {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s ago\t%s\n", name, shortID(v.ImageID), strings.Join(v.Nodes, ","), v.Containers,
				st.Time.Sub(v.Since).Round(time.Second), state)
			if i == 0 {
				name, state = "", ""
			}
		}
	}
	var retrying bool
	for _, n := range st.Nodes {
		for _, r := range n.Retries {
			if !retrying {
				fmt.Fprintln(tw)
				fmt.Fprintln(tw, "RETRYING\tNODE\tATTEMPTS\tSINCE\tNEXT IN\tLAST ERROR")
				retrying = true
			}
			name := r.Repo
			if len(r.Tags) > 0 {
				name += ":" + strings.Join(r.Tags, ",")
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s ago\t%s\t%s\n", name, n.Node, r.Attempts, st.Time.Sub(r.Since).Round(time.Second),
				max(r.Next.Sub(st.Time), 0).Round(time.Second), truncate(r.Error, 120))
		}
	}
	var leftAlone bool
	for _, n := range st.Nodes {
		for _, l := range n.LeftAlone {
			if !leftAlone {
				fmt.Fprintln(tw)
				fmt.Fprintln(tw, "LEFT ALONE\tNODE\tVERSION\tSINCE\tREASON")
				leftAlone = true
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s ago\t%s\n", l.Name, n.Node, leftAloneVersion(l.Image), st.Time.Sub(l.Since).Round(time.Second), truncate(l.Reason, 120))
		}
	}
	if len(st.Freezes) > 0 {
		fmt.Fprintln(tw)
		fmt.Fprintln(tw, "FROZEN\tSINCE\tUNTIL\tREASON\tBY")
		for _, f := range st.Freezes {
			until := "thaw"
			if !f.Until.IsZero() {
				until = f.Until.UTC().Format(time.DateTime) + " UTC"
			}
			fmt.Fprintf(tw, "%s\t%s ago\t%s\t%s\t%s\n", displayScope(f.Scope), st.Time.Sub(f.Since).Round(time.Second), until, orDash(f.Reason), f.By)
		}
	}
	if len(st.Policies) > 0 {
		fmt.Fprintln(tw)
		fmt.Fprintln(tw, "POLICY\tSETS")
		for _, p := range st.Policies {
			b, _ := json.Marshal(p.Policy)
			fmt.Fprintf(tw, "%s\t%s\n", cmp.Or(p.Ref, "(default)"), b)
		}
	}
	fmt.Fprintln(tw)
	fmt.Fprintln(tw, "NODE\tVERSION\tUP\tUPDATED")
	for _, n := range st.Nodes {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s ago\n", n.Node, n.Version, st.Time.Sub(n.Started).Round(time.Second), st.Time.Sub(n.Updated).Round(time.Second))
	}
	tw.Flush()
}

// leftAloneVersion is the version a container is left alone for.
func leftAloneVersion(image string) string {
	if image == "" {
		return "every"
	}
	return shortID(image)
}
