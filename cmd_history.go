package main

// cmd_history.go: deployer history, the deploy ledger (ledger.go) as a
// table or JSON.

import (
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

// historyCommand is `deployer history [repository[:tag]]`: the versions of
// every tag (or of those named), newest first. It takes the daemon's
// command line, as `deployer status` does; the filter may come before or
// after the flags.
func historyCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var asJSON bool
	own := historyOwnFlags(&asJSON)
	args, name := cutHistoryArg(args, own)
	f, err := parseHistoryFilter(name)
	if err != nil {
		return err
	}
	ce, err := parseCommand("deployer history", args, os.Getenv, stderr, own)
	if err != nil {
		return err
	}
	var h historyView
	err = ce.read(ctx, stderr, func(ctx context.Context, kv clientv3.KV) (err error) {
		h, err = readHistory(ctx, kv, f, time.Now())
		return err
	})
	if err != nil {
		return fmt.Errorf("read the deploy ledger from %s: %w", strings.Join(ce.cfg.etcdEndpoints(), ","), err)
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(h)
	}
	printHistory(stdout, h)
	return nil
}

// historyOwnFlags defines the flags of deployer history.
func historyOwnFlags(asJSON *bool) func(*flag.FlagSet) {
	return func(fs *flag.FlagSet) {
		fs.BoolVar(asJSON, "json", false, "print JSON instead of a table")
	}
}

// cutHistoryArg takes the repository[:tag] out of args: the first
// argument that is not a flag or a flag's value, found as the daemon's
// flags parse it (own adds the command's flags).
func cutHistoryArg(args []string, own func(*flag.FlagSet)) ([]string, string) {
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		return args[1:], args[0]
	}
	b := bindFlags("deployer history", func(string) string { return "" }, io.Discard)
	own(b.fs)
	if b.fs.Parse(args) != nil || b.fs.NArg() == 0 {
		return args, ""
	}
	rest := b.fs.Args()
	head := args[:len(args)-len(rest)]
	return append(head[:len(head):len(head)], rest[1:]...), rest[0]
}

func printHistory(w io.Writer, h historyView) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IMAGE\tVERSION\tIMAGE ID\tDIGEST\tPUSHED\tFIRST NODE\tLAST NODE\tNODES\tOUTCOME")
	if len(h.Tags) == 0 {
		fmt.Fprintln(tw, "(no versions recorded)")
	}
	for _, t := range h.Tags {
		name := t.Image
		for _, v := range t.Versions {
			first, last := "-", "-"
			if v.converged() > 0 {
				first = leadTime(v.FirstSeconds)
			}
			if !v.Completed.IsZero() {
				last = leadTime(v.LastSeconds)
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s ago\t%s\t%s\t%s\t%s\n", name, v.Version, shortID(v.ImageID), shortDigest(v.Digest),
				h.Time.Sub(v.Pushed).Round(time.Second), first, last, v.nodesSummary(), v.outcomeText())
			name = ""
		}
	}
	tw.Flush()
}

// outcomeText is v's outcome, and why the nodes held it when they did.
func (v ledgerVersion) outcomeText() string {
	if v.Override != "" {
		return v.Outcome + " (" + v.Override + ")"
	}
	if v.Held == "" || v.Held == v.Outcome {
		return v.Outcome
	}
	if v.Outcome == outcomeRollingOut {
		return "waiting: " + v.Held
	}
	if v.Outcome == outcomeHeld {
		if strings.HasPrefix(v.Held, "held ") {
			return v.Held // "held by pin …"
		}
		return "waiting: " + v.Held // a freeze or a window (hold.go)
	}
	return v.Outcome + "; " + v.Held
}

func leadTime(seconds float64) string {
	return (time.Duration(seconds * float64(time.Second))).Round(10 * time.Millisecond).String()
}

// shortDigest is a manifest digest as Docker shows it: 12 hex digits.
func shortDigest(d string) string {
	if d == "" {
		return "-"
	}
	algo, hex, ok := strings.Cut(d, ":")
	if !ok || len(hex) <= 12 {
		return d
	}
	return algo + ":" + hex[:12]
}
