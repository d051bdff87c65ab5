package main

// redact.go: keeping secrets in URLs (tokens, capabilities) out of logs
// and errors.

import (
	"net/url"
	"strings"
)

// Secret URLs (the Slack webhook URL, whose path is its token, the -notify
// URLs, and Docker Hub callback URLs) never appear in logs, errors, metrics or status: the
// HTTP client's errors (*url.Error) carry the whole URL.

// redactURL is what may be shown of a secret URL: its scheme and host.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return "[redacted URL]"
	}
	return u.Scheme + "://" + u.Host + "/[redacted]"
}

// minSecretLen: shorter user names in a URL ("user", "admin") are not
// taken for tokens (hiding them would garble errors, not protect them).
const minSecretLen = 8

// redactedError hides secret URLs in an error's text; errors.Is and As
// still see the error it wraps.
type redactedError struct {
	msg string
	err error
}

func (e *redactedError) Error() string { return e.msg }
func (e *redactedError) Unwrap() error { return e.err }

// redactErr returns err with every form of every secret URL in its text
// replaced by redactURL's.
func redactErr(err error, secrets ...string) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	for _, s := range secrets {
		if s == "" {
			continue
		}
		forms := []string{s}
		if u, perr := url.Parse(s); perr == nil {
			forms = append(forms, u.String(), u.Redacted())
			if p := u.EscapedPath(); len(p) > 1 {
				forms = append(forms, p, u.Path)
			}
			if u.RawQuery != "" {
				forms = append(forms, u.RawQuery)
			}
			// Service URLs (-notify) carry tokens as the user or the
			// password too (telegram://123:token@telegram, discord://
			// token@id), which the service puts in its own API's path.
			if u.User != nil {
				p, _ := u.User.Password()
				for _, part := range []string{u.User.Username(), p} {
					if len(part) >= minSecretLen {
						forms = append(forms, part)
					}
				}
			}
		}
		for _, f := range forms {
			if f != "" && strings.Contains(msg, f) {
				repl := "[redacted]"
				if strings.Contains(f, "://") {
					repl = redactURL(s)
				}
				msg = strings.ReplaceAll(msg, f, repl)
			}
		}
	}
	if msg == err.Error() {
		return err
	}
	return &redactedError{msg: msg, err: err}
}
