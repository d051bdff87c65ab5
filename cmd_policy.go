package main

// cmd_policy.go: deployer policy, freeze, thaw and deploy (README,
// Release policy). Each takes the daemon's command line, as deployer
// status does.

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/die-net/deployer/internal/etcdc"
)

// policyFlags are the fields deployer policy sets, as flags that follow
// the image (or -default): the daemon's own flags come before it, so that
// the daemon's -max_unavailable is never taken for the policy's.
type policyFlags struct {
	fs                                 *flag.FlagSet
	canaryNodes, canaryLabels, windows string
	bake, upAfter, maxUnavail, promote string
	unset                              string
}

func newPolicyFlags(stderr io.Writer) *policyFlags {
	p := &policyFlags{fs: flag.NewFlagSet("deployer policy", flag.ContinueOnError)}
	fs := p.fs
	fs.SetOutput(stderr)
	fs.StringVar(&p.canaryNodes, "canary_nodes", "", "comma-separated node names (-node_name) that get a new version first")
	fs.StringVar(&p.canaryLabels, "canary_labels", "", "comma-separated labels: nodes started with one of them (-node_labels) are canaries")
	fs.StringVar(&p.bake, "bake", "", "how long every canary replacement must stay up before the rest (90s, 10m)")
	fs.StringVar(&p.promote, "promotion", "", "auto or manual (deployer promote)")
	fs.StringVar(&p.maxUnavail, "max_unavailable", "", "containers of the tag down at once across the cluster: a count (2) or a percentage of them (25%); 0: all at once")
	fs.StringVar(&p.upAfter, "up_after", "", "how long a replacement without a health check must run before it counts as up (1s)")
	fs.StringVar(&p.windows, "windows", "", `deploy windows, separated by ';': "Mon-Fri 09:00-17:00 Europe/Berlin", "cron * 9-16 * * 1-5"; '' for always`)
	fs.StringVar(&p.unset, "unset", "", "comma-separated fields to clear (they come from the default again), or all: "+strings.Join(policyFields, ", "))
	return p
}

// change returns the fields the flags set, and those to unset.
func (p *policyFlags) change() (policy, []string, error) {
	var rec policy
	var err error
	list := func(s string) *[]string {
		l := splitList(s)
		if l == nil {
			l = []string{}
		}
		return &l
	}
	dur := func(name, s string) *jsonDur {
		if err != nil {
			return nil
		}
		var d time.Duration
		if d, err = time.ParseDuration(s); err != nil {
			err = fmt.Errorf("%w: -%s: %w", errUsage, name, err)
		}
		return durPtr(d)
	}
	p.fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "canary_nodes":
			rec.CanaryNodes = list(p.canaryNodes)
		case "canary_labels":
			rec.CanaryLabels = list(p.canaryLabels)
		case "bake":
			rec.Bake = dur("bake", p.bake)
		case "up_after":
			rec.UpAfter = dur("up_after", p.upAfter)
		case "promotion":
			rec.Promotion = p.promote
		case "max_unavailable":
			var u unavailable
			if u, err = parseUnavailable(p.maxUnavail); err == nil {
				rec.MaxUnavailable = &u
			}
		case "windows":
			ws := []string{}
			for _, w := range strings.Split(p.windows, ";") {
				if w = strings.TrimSpace(w); w != "" {
					ws = append(ws, w)
				}
			}
			rec.Windows = &ws
		}
	})
	if err != nil {
		return policy{}, nil, err
	}
	if err := rec.validate(); err != nil {
		return policy{}, nil, fmt.Errorf("%w: %w", errUsage, err)
	}
	return rec, splitList(p.unset), nil
}

// splitPolicyArgs cuts deployer policy's command line into the daemon's
// flags, the target (an image, "" for -default, none to list) and the
// policy's flags after it.
func splitPolicyArgs(args []string) (daemon []string, target string, isDefault, set bool, fields []string) {
	for i, a := range args {
		if a == "-default" || a == "--default" {
			return args[:i], "", true, true, args[i+1:]
		}
	}
	b := bindFlags("deployer policy", func(string) string { return "" }, io.Discard)
	if b.fs.Parse(args) != nil || b.fs.NArg() == 0 {
		return args, "", false, false, nil
	}
	rest := b.fs.Args()
	return args[:len(args)-len(rest)], rest[0], false, true, rest[1:]
}

// policyCommand is `deployer policy`: alone, every policy and the
// default; `deployer policy repository:tag [policy flags]` or `deployer
// policy -default [policy flags]` sets one.
func policyCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	daemonArgs, image, isDefault, set, fieldArgs := splitPolicyArgs(args)
	var asJSON bool
	ce, err := parseCommand("deployer policy", daemonArgs, os.Getenv, stderr, func(fs *flag.FlagSet) {
		fs.BoolVar(&asJSON, "json", false, "print JSON instead of a table")
	}, "registry", "max_unavailable", "up_after")
	if err != nil {
		return err
	}
	cli, err := ce.client(ctx, stderr)
	if err != nil {
		return err
	}
	defer cli.Close()
	kv := etcdc.InPrefix(cli, ce.cfg.EtcdPrefix)
	ps := newPolicies(kv, basePolicy(ce.cfg.MaxUnavailable, ce.cfg.UpAfter))
	if set {
		pf := newPolicyFlags(stderr)
		if err := pf.fs.Parse(fieldArgs); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return err
			}
			return fmt.Errorf("%w: %w", errUsage, err)
		}
		if pf.fs.NArg() > 0 {
			return fmt.Errorf("%w: unexpected argument %q", errUsage, pf.fs.Arg(0))
		}
		ref := ""
		if !isDefault {
			domain, err := registryHost(ce.cfg.Registry)
			if err != nil {
				return fmt.Errorf("%w: -registry: %w", errUsage, err)
			}
			tagged, err := parseRollbackImage(image, domain)
			if err != nil {
				return err
			}
			ref = tagged.String()
		}
		change, unset, err := pf.change()
		if err != nil {
			return err
		}
		host, _ := os.Hostname()
		if _, err := ps.set(ctx, ref, change, unset, "deployer policy ("+host+")", time.Now()); err != nil {
			return err
		}
	}
	view, err := readPolicies(ctx, ps)
	if err != nil {
		return err
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(view)
	}
	printPolicies(stdout, view)
	return nil
}

// policyView is every policy: the default and each tag's, as stored and
// in effect (GET /api/policy, deployer policy, the status view).
type policyView struct {
	Default policyEntry   `json:"default"`
	Tags    []policyEntry `json:"tags"`
}

type policyEntry struct {
	Image     string        `json:"image,omitempty"`
	Stored    policy        `json:"stored"`    // the record: what it sets
	Effective rolloutPolicy `json:"effective"` // with what it leaves to the default and the flags
}

func readPolicies(ctx context.Context, ps *policies) (policyView, error) {
	list, err := ps.list(ctx)
	if err != nil {
		return policyView{}, err
	}
	var def policy
	if len(list) > 0 && list[0].Ref == "" {
		def, list = list[0].Policy, list[1:]
	}
	v := policyView{Default: policyEntry{Stored: def, Effective: def.over(ps.base)}, Tags: []policyEntry{}}
	for _, sp := range list {
		v.Tags = append(v.Tags, policyEntry{Image: sp.Ref, Stored: sp.Policy, Effective: sp.Policy.over(v.Default.Effective)})
	}
	return v, nil
}

func printPolicies(w io.Writer, v policyView) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IMAGE\tMAX UNAVAILABLE\tUP AFTER\tCANARIES\tBAKE\tPROMOTION\tWINDOWS\tSET BY")
	row := func(name string, e policyEntry) {
		p := e.Effective
		canaries := strings.Join(slices.Concat(p.CanaryNodes, prefixed("label:", p.CanaryLabels)), ",")
		ws := make([]string, len(p.Windows))
		for i, win := range p.Windows {
			ws[i] = win.spec
		}
		by := "-"
		if !e.Stored.Updated.IsZero() {
			by = e.Stored.UpdatedBy + " " + e.Stored.Updated.Format(time.DateTime)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", name, p.MaxUnavailable, p.UpAfter, orDash(canaries), p.Bake, p.Promotion,
			orDash(strings.Join(ws, "; ")), by)
	}
	row("(default)", v.Default)
	for _, e := range v.Tags {
		row(e.Image, e)
	}
	tw.Flush()
}

func prefixed(p string, l []string) []string {
	out := make([]string, len(l))
	for i, s := range l {
		out[i] = p + s
	}
	return out
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// holdCommand parses the command line of freeze, thaw and deploy: the
// daemon's, own's flags, and an optional image before or after them.
func holdCommand(ctx context.Context, name string, args []string, stderr io.Writer, own func(*flag.FlagSet)) (*holdOps, string, func(), error) {
	args, image := cutHistoryArg(args, own)
	ce, err := parseCommand(name, args, os.Getenv, stderr, own, "registry")
	if err != nil {
		return nil, "", nil, err
	}
	domain, err := registryHost(ce.cfg.Registry)
	if err != nil {
		return nil, "", nil, fmt.Errorf("%w: -registry: %w", errUsage, err)
	}
	cli, err := ce.client(ctx, stderr)
	if err != nil {
		return nil, "", nil, err
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	ops := newHoldOps(etcdc.InPrefix(cli, ce.cfg.EtcdPrefix), basePolicy(ce.cfg.MaxUnavailable, ce.cfg.UpAfter), domain, log)
	return ops, image, func() { cli.Close() }, nil
}

// freezeCommand is `deployer freeze [repository[:tag]] [-until T] [-reason text]`.
func freezeCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var req freezeRequest
	ops, image, closeFn, err := holdCommand(ctx, "deployer freeze", args, stderr, func(fs *flag.FlagSet) {
		fs.StringVar(&req.Until, "until", "", "end the freeze by itself then: an RFC 3339 time, \"2006-01-02 15:04\" (UTC) or a duration (2h); empty: until deployer thaw")
		fs.StringVar(&req.Reason, "reason", "", "why, shown with every version the freeze holds")
	})
	if err != nil {
		return err
	}
	defer closeFn()
	req.Scope = image
	host, _ := os.Hostname()
	f, err := ops.freeze(ctx, req, "deployer freeze ("+host+")")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(stdout, "%s: %s; new versions are pulled and wait (deployer status), nothing is replaced\n", displayScope(f.Scope), f.holdText())
	return err
}

// thawCommand is `deployer thaw [repository[:tag]]`.
func thawCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	ops, image, closeFn, err := holdCommand(ctx, "deployer thaw", args, stderr, func(*flag.FlagSet) {})
	if err != nil {
		return err
	}
	defer closeFn()
	host, _ := os.Hostname()
	res, err := ops.thaw(ctx, image, askedBy{Node: host})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s thawed", displayScope(res.Scope))
	if len(res.Released) > 0 {
		fmt.Fprintf(stdout, "; every node deploys now: %s", strings.Join(res.Released, ", "))
	}
	fmt.Fprintln(stdout)
	for _, h := range res.Held {
		fmt.Fprintf(stdout, "still waiting: %s\n", h)
	}
	return nil
}

// deployCommand is `deployer deploy repository:tag [-now]`: the tag's
// trigger, as a push writes it; with -now, past a freeze or a closed
// window, once.
func deployCommand(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var now bool
	ops, image, closeFn, err := holdCommand(ctx, "deployer deploy", args, stderr, func(fs *flag.FlagSet) {
		fs.BoolVar(&now, "now", false, "deploy past a freeze or a closed deploy window, once (recorded in the ledger)")
	})
	if err != nil {
		return err
	}
	defer closeFn()
	if image == "" {
		return fmt.Errorf("%w: deployer deploy repository:tag [-now]", errUsage)
	}
	host, _ := os.Hostname()
	if !now {
		ref, err := parseRollbackImage(image, ops.registryDomain)
		if err != nil {
			return err
		}
		b, _ := json.Marshal(trigger{Time: time.Now().UTC(), Tag: ref.Tag(), Source: "cli", Remote: host})
		ctx, cancel := context.WithTimeout(ctx, callTimeout)
		defer cancel()
		resp, err := ops.kv.Put(ctx, triggerKey(ref.Name()), string(b))
		if err != nil {
			return fmt.Errorf("write the trigger: %w", err)
		}
		_, err = fmt.Fprintf(stdout, "%s: trigger written at revision %d\n", ref, resp.Header.Revision)
		return err
	}
	res, err := ops.deployNow(ctx, image, host, "")
	if err != nil {
		return err
	}
	switch {
	case res.Held != "" && res.ImageID != "":
		_, err = fmt.Fprintf(stdout, "%s: the waiting version %s deploys now on every node, past: %s (revision %d)\n", res.Image, shortID(res.ImageID), res.Held, res.Revision)
	case res.Held != "":
		_, err = fmt.Fprintf(stdout, "%s: deploys now on every node, past: %s (revision %d)\n", res.Image, res.Held, res.Revision)
	default:
		_, err = fmt.Fprintf(stdout, "%s: nothing holds it; trigger written (revision %d)\n", res.Image, res.Revision)
	}
	return err
}

// policyCommands are the subcommands of this file, by name.
var policyCommands = map[string]func(ctx context.Context, args []string, stdout, stderr io.Writer) error{
	"policy": policyCommand,
	"freeze": freezeCommand,
	"thaw":   thawCommand,
	"deploy": deployCommand,
}

func firstArg(args []string) string {
	if len(args) == 0 {
		return ""
	}
	return args[0]
}
