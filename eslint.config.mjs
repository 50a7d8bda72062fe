// npm run lint: typescript-eslint with type information over the TypeScript
// (src/, test/, bench/), the core rules over the plain JavaScript (bin/,
// demo/, the .cjs fixtures), and one layout for every file through ESLint
// Stylistic (npm run format fixes it).
import js from '@eslint/js';
import stylistic from '@stylistic/eslint-plugin';
import globals from 'globals';
import tseslint from 'typescript-eslint';

const layout = {
	plugins: { '@stylistic': stylistic },
	rules: {
		'@stylistic/indent': ['error', 'tab', { SwitchCase: 0, flatTernaryExpressions: true, ignoredNodes: ['ConditionalExpression *'] }],
		'@stylistic/no-mixed-spaces-and-tabs': 'error',
		'@stylistic/no-trailing-spaces': 'error',
		'@stylistic/eol-last': 'error',
		'@stylistic/no-multiple-empty-lines': ['error', { max: 1, maxEOF: 0 }],
		'@stylistic/quotes': ['error', 'single', { avoidEscape: true }],
		'@stylistic/semi': ['error', 'always'],
		'@stylistic/comma-dangle': ['error', 'always-multiline'],
		'@stylistic/brace-style': ['error', '1tbs', { allowSingleLine: true }],
		'@stylistic/keyword-spacing': 'error',
		'@stylistic/space-before-blocks': 'error',
		'@stylistic/space-infix-ops': 'error',
		'@stylistic/comma-spacing': 'error',
		'@stylistic/key-spacing': 'error',
		'@stylistic/arrow-parens': ['error', 'always'],
		'@stylistic/max-len': ['error', { code: 130, tabWidth: 4, ignoreUrls: true, ignoreStrings: true, ignoreTemplateLiterals: true, ignoreRegExpLiterals: true }],
	},
};

export default tseslint.config(
	{ ignores: ['dist/', 'build/', 'node_modules/', 'coverage/', 'reports/', '.stryker-tmp/', 'bench/results/'] },
	{
		files: ['**/*.{js,mjs,cjs}'],
		extends: [js.configs.recommended],
		languageOptions: { globals: { ...globals.node } },
	},
	{
		files: ['**/*.cjs'],
		languageOptions: { sourceType: 'commonjs' },
	},
	{
		files: ['**/*.ts'],
		extends: [...tseslint.configs.recommendedTypeChecked],
		languageOptions: {
			parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
		},
		rules: {
			'@typescript-eslint/no-floating-promises': 'error',
			'@typescript-eslint/no-misused-promises': 'error',
			'@typescript-eslint/restrict-template-expressions': ['error', {
				allowNumber: true, allowBoolean: true, allowArray: true, allowNullish: true,
			}],
			'@typescript-eslint/prefer-promise-reject-errors': ['error', { allowThrowingUnknown: true }],
			'@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
		},
	},
	{
		// tap runs the subtests a file declares whether or not their promise
		// is awaited, and a test body is async by convention.
		files: ['test/**/*.ts'],
		rules: {
			'@typescript-eslint/require-await': 'off',
			'@typescript-eslint/prefer-promise-reject-errors': 'off',
			'@typescript-eslint/no-floating-promises': ['error', {
				allowForKnownSafePromises: [{ from: 'package', package: '@tapjs/core', name: 'PromiseWithSubtest' }],
			}],
		},
	},
	{
		// The dashboard's page script runs in the browser (an ES module), next
		// to uPlot's global; none of Node's globals exist there.
		files: ['dashboard/**/*.js'],
		languageOptions: {
			sourceType: 'module',
			globals: {
				...Object.fromEntries(Object.keys(globals.node).map((name) => [name, 'off'])),
				...globals.browser,
				uPlot: 'readonly',
			},
		},
	},
	layout,
);
