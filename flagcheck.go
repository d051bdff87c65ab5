package main

// flagcheck.go: the check of the webhook path flags: a literal path
// ServeMux can register.

import (
	"fmt"
	"net/http"
	"regexp"
)

// plainPath is a URL path made of unreserved characters, sub-delimiters,
// ':', '@', '%' and '/': nothing net/http.ServeMux reads as a pattern
// ({wildcards}, a method or host before the path) and nothing a client
// would escape.
var plainPath = regexp.MustCompile(`^/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*$`)

// checkPlainPath accepts a webhook path that ServeMux registers as the
// literal path it is. A pattern such as /hook/{ makes ServeMux panic; it
// is a flag error instead.
func checkPlainPath(p string) (err error) {
	if !plainPath.MatchString(p) {
		return fmt.Errorf("%q must be a plain path starting with / (letters, digits and -._~!$&'()*+,;=:@%%/ only)", p)
	}
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%q is not a usable path: %v", p, r)
		}
	}()
	http.NewServeMux().HandleFunc(p, func(http.ResponseWriter, *http.Request) {})
	return nil
}
