package nolint

import "os"

func reported() {
	os.Remove("a") // want `Error return value of .os.Remove. is not checked \(errcheck\)`
}

func sameLine() {
	os.Remove("a") //nolint:errcheck // the reason
}

func otherLinter() {
	os.Remove("a") //nolint:gosec // want `Error return value of .os.Remove. is not checked \(errcheck\)`
}

func listed() {
	os.Remove("a") //nolint:gosec,errcheck // both
}

func bare() {
	os.Remove("a") //nolint
}

func all() {
	os.Remove("a") //nolint:all // every linter
}

//nolint:errcheck // the whole declaration below
func wholeFunc() {
	os.Remove("a")
	os.Remove("b")
}

// inDoc has the directive at the end of its doc comment.
//
//nolint:errcheck // the whole declaration below
func inDoc() {
	os.Remove("a")
}

func statement() {
	//nolint:errcheck // the statement below, all of it
	if true {
		os.Remove("a")
	}
	os.Remove("b") // want `Error return value of .os.Remove. is not checked \(errcheck\)`
}

func otherColumn() {
	_ = os.Getpid() //nolint:errcheck // at the end of a line: that line only
	os.Remove("a")  // want `Error return value of .os.Remove. is not checked \(errcheck\)`
}
